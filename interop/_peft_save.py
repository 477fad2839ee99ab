"""Save adapters of NNX models as PEFT adapters (``interop.peft.save_adapter`` / ``collect_adapter``).

The written ``adapter_config.json`` must make PEFT rebuild exactly the model's layers and block layouts, or
``PeftModel.from_pretrained`` reports missing or mis-shaped keys. A given config is checked against the model;
without one, a config is inferred: ``target_modules`` = the layers' full paths, one ``r`` or
``oft_block_size`` that PEFT's per-layer adjustment turns into every layer's layout, ``bias`` from which
biases are trainable (``OFTBias``).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from oftjax import oft
from oftjax.config import OFTConfig
from oftjax.nn import ModulePath, OFTAdapters, OFTBias, OFTEmbed
from oftjax.surgery import is_adaptable_embedding, is_adaptable_linear

from . import _peft_format as fmt
from ._io import InteropError
from ._nnx_names import base_module, module_table
from ._peft_files import write_adapter


def _common(values: list[Any], what: str, adapter_name: str) -> Any:
    distinct = sorted(set(values), key=repr)
    if len(distinct) != 1:
        raise InteropError(
            f"adapter {adapter_name!r}: layers disagree on {what} ({distinct}); one PEFT config cannot "
            "express that"
        )
    return distinct[0]


# AdapterSettings fields that are OFTConfig fields of the same name (one value per adapter in PEFT).
_SETTING_FIELDS = (
    "coft",
    "eps",
    "block_share",
    "use_cayley_neumann",
    "num_cayley_neumann_terms",
    "legacy_neumann",
    "module_dropout",
)


def _bias(module: Any) -> Any:
    """The bias variable (or None) HF names ``<module>.bias``: an OFT layer's is its base layer's."""
    return getattr(base_module(module), "bias", None)


def _bias_mode(table: Mapping[str, tuple[ModulePath, Any]], layers: Mapping[str, OFTAdapters]) -> str:
    """PEFT's ``bias`` that saves exactly the biases made trainable (``OFTBias``) in the model."""
    trainable = {p for p, (_, m) in table.items() if isinstance(_bias(m), OFTBias)}
    with_bias = {p for p, m in layers.items() if _bias(m) is not None}
    if trainable and trainable <= set(layers):
        return "oft_only"
    if trainable and with_bias <= trainable:
        return "all"
    return "none"  # no trainable biases, or they belong to another adapter's layers


def _infer_config(layers: Mapping[str, OFTAdapters], adapter_name: str, bias: str = "none") -> OFTConfig:
    """An OFTConfig reproducing every layer's settings (the layout PEFT rebuilds from it must match)."""
    settings = [layer.adapters[adapter_name] for layer in layers.values()]
    common = {f: _common([getattr(s, f) for s in settings], f, adapter_name) for f in _SETTING_FIELDS}
    sizes = collections.Counter(s.block_size for s in settings)
    ranks = collections.Counter(s.r for s in settings)
    candidates = [dict(r=0, oft_block_size=b) for b, _ in sizes.most_common()]
    candidates += [dict(r=r, oft_block_size=0) for r, _ in ranks.most_common()]
    for cand in candidates:
        config = OFTConfig(target_modules=sorted(layers), bias=bias, **cand, **common)
        if not _layout_mismatches(config, layers, adapter_name):
            return config
    raise InteropError(
        f"adapter {adapter_name!r}: the layers' block sizes {dict(sizes)} / blocks {dict(ranks)} cannot come "
        "from one PEFT config (no single r or oft_block_size gives them all); PEFT could not load this "
        "adapter"
    )


def _layout_mismatches(config: OFTConfig, layers: Mapping[str, OFTAdapters], adapter_name: str) -> list[str]:
    bad = []
    for path, layer in layers.items():
        s = layer.adapters[adapter_name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's "Adjusted ..." warning: expected here
            r, b = oft.resolve_block_size(layer.in_features, config.r, config.oft_block_size)
        if (r, b) != (s.r, s.block_size):
            bad.append(f"{path}: has r={s.r}, b={s.block_size}; the config gives r={r}, b={b}")
    return bad


def _check_config(
    config: OFTConfig, layers: Mapping[str, OFTAdapters], table: Mapping, adapter_name: str
) -> None:
    bad = _layout_mismatches(config, layers, adapter_name)
    for path, layer in layers.items():
        s = layer.adapters[adapter_name]
        for f in _SETTING_FIELDS:
            if getattr(s, f) != getattr(config, f):
                bad.append(f"{path}: {f}={getattr(s, f)!r} but the config has {getattr(config, f)!r}")
        if not config.is_target(path):
            bad.append(f"{path}: carries the adapter but the config's target_modules do not select it")
    for path, (_, module) in table.items():
        embed = is_adaptable_embedding(module)
        adaptable = embed or is_adaptable_linear(module)
        if path not in layers and adaptable and not (config.is_all_linear and embed):
            if config.is_target(path):
                bad.append(
                    f"{path}: selected by the config's target_modules but has no {adapter_name!r} adapter"
                )
    if bad:
        raise InteropError(
            f"adapter {adapter_name!r}: the config disagrees with the model, so PEFT would load it with "
            "missing "
            f"or mis-shaped keys: {bad[:5]}"
        )


def _saves_embedding_table(path: str, layer: Any, save_embedding_layers: bool | str) -> bool:
    """PEFT's ``save_embedding_layers``: "auto" saves the base table of a targeted input embedding
    (``embed_tokens``: what PEFT writes for a transformers model); True for every adapted embedding."""
    if not isinstance(layer, OFTEmbed):
        return False
    if save_embedding_layers == "auto":
        return path.rpartition(".")[2] == "embed_tokens"
    if not isinstance(save_embedding_layers, bool):
        raise ValueError(
            f"save_embedding_layers must be True, False or 'auto'; got {save_embedding_layers!r}"
        )
    return save_embedding_layers


def collect_adapter(
    model: Any,
    adapter_name: str = "default",
    config: OFTConfig | None = None,
    *,
    save_embedding_layers: bool | str = "auto",
) -> tuple[OFTConfig, dict[str, np.ndarray]]:
    """The ``(config, PEFT-named tensors)`` of one adapter of an NNX model (what ``save_adapter`` writes).

    Without ``config``, one is inferred from the layers (``target_modules`` = their full paths; ``bias`` from
    which biases are trainable ``OFTBias``: "oft_only" if only this adapter's layers' ones, "all" if those
    and others, else "none"). A given config
    is checked: it must select exactly the layers carrying the adapter and reproduce each layer's layout.
    ``save_embedding_layers`` (PEFT's option) adds ``<module>.base_layer.weight``, the base table of adapted
    embeddings: "auto" for ``embed_tokens`` modules, as PEFT's ``save_pretrained`` does for transformers
    models.
    """
    table = module_table(model)
    layers = {
        path: m for path, (_, m) in table.items() if isinstance(m, OFTAdapters) and adapter_name in m.adapters
    }
    if not layers:
        found = sorted({n for _, m in table.values() if isinstance(m, OFTAdapters) for n in m.adapters})
        raise InteropError(f"the model has no OFT adapter named {adapter_name!r} (adapters found: {found})")
    if config is None:
        config = _infer_config(layers, adapter_name, _bias_mode(table, layers))
    else:
        _check_config(config, layers, table, adapter_name)
    return config, _adapter_tensors(table, layers, adapter_name, config, save_embedding_layers)


def _adapter_tensors(
    table: Mapping[str, tuple[ModulePath, Any]],
    layers: Mapping[str, OFTAdapters],
    adapter_name: str,
    config: OFTConfig,
    save_embedding_layers: bool | str,
) -> dict[str, np.ndarray]:
    """The PEFT-named tensors: rotations, then the base tensors PEFT saves (``<module>.base_layer.*``)."""
    tensors: dict[str, np.ndarray] = {}
    for path, layer in layers.items():
        # oft_R for linears, oft_embedding_R for embeddings (the layer's PEFT attribute name).
        key = f"{fmt.PEFT_PREFIX}{path}.{layer.PARAM_NAME}.weight"
        tensors[key] = np.asarray(layer.rotation_params[adapter_name][...])
        if _saves_embedding_table(path, layer, save_embedding_layers):
            table_var = base_module(layer).embedding
            tensors[f"{fmt.PEFT_PREFIX}{path}.base_layer.weight"] = np.asarray(table_var[...])
    if config.bias in ("oft_only", "all"):
        for path, layer in layers.items():
            if _bias(layer) is not None:
                tensors[f"{fmt.PEFT_PREFIX}{path}.base_layer.bias"] = np.asarray(_bias(layer)[...])
    if config.bias == "all":
        for path, (_, module) in table.items():
            bias = _bias(module)
            if path not in layers and isinstance(bias, nnx.Variable) and bias[...] is not None:
                tensors[f"{fmt.PEFT_PREFIX}{path}.bias"] = np.asarray(bias[...])
    return tensors


def save_adapter(
    model: Any,
    path: str | os.PathLike,
    adapter_name: str = "default",
    force: bool = False,
    *,
    config: OFTConfig | None = None,
    save_embedding_layers: bool | str = "auto",
) -> Path:
    """Write one adapter of ``model`` as a PEFT adapter directory (``PeftModel.from_pretrained`` loads it with
    no missing or unexpected keys). A non-default ``adapter_name`` goes to ``path/<adapter_name>``, as PEFT
    saves.

    Args:
        model: an NNX model with OFT layers (``OFTLinear``, ``OFTEmbed``) carrying ``adapter_name``.
        path: the save directory.
        adapter_name: which adapter.
        force: overwrite existing adapter files.
        config: the OFTConfig to write (checked against the model); inferred when None.
        save_embedding_layers: also write the base table of adapted embeddings (PEFT's option; "auto": of
            ``embed_tokens`` modules, as PEFT does for transformers models).

    Returns:
        The directory written.

    Example:
        >>> save_adapter(model, "peft_adapter_dir")  # doctest: +SKIP
    """
    fmt.check_adapter_name(adapter_name)
    config, tensors = collect_adapter(
        model, adapter_name, config, save_embedding_layers=save_embedding_layers
    )
    # As PEFT's save_pretrained: inference_mode is saved True; the file is ours, so claim our PEFT version
    # (a legacy-series adapter keeps its pre-0.18 version so PEFT warns).
    version = config.peft_version if config.legacy_neumann else None
    config = dataclasses.replace(config, inference_mode=True, peft_version=version)
    return write_adapter(path, config, tensors, adapter_name=adapter_name, force=force)
