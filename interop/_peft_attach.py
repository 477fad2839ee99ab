"""Attach PEFT OFT adapters to NNX models (``interop.peft.load_adapter`` / ``attach_adapter``).

A model's module names are its module paths (``interop._nnx_names``: attribute names joined by dots, list
indices as numbers, ``model.layers.0.self_attn.q_proj``): exactly PEFT's module names for a torch model built
the same way. The per-layer block layout comes from the tensor shapes (PEFT adjusts r/b per layer): ``b``
from ``n = b(b-1)/2`` and ``r = shape[0]`` (``in_features / b`` with ``block_share``). Layers named by
``oft_R.weight`` are wrapped in ``oftjax.nn.OFTLinear``, embeddings (``nnx.Embed``) named by
``oft_embedding_R.weight`` in ``oftjax.nn.OFTEmbed`` (or get one more adapter if already wrapped). The base
tensors PEFT saves (``<module>.base_layer.bias``, and the table ``<module>.base_layer.weight`` next to a
targeted input embedding) are loaded into the base layer, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from oftjax.config import OFTConfig
from oftjax.nn import AdapterSettings, ModulePath, OFTAdapters, OFTBias, base_ops, replace_module
from oftjax.surgery import as_oft_layer, is_adaptable_embedding, is_adaptable_linear, oft_layers

from . import _peft_format as fmt
from ._io import InteropError
from ._nnx_names import base_module, module_table
from ._peft_files import read_adapter_with_extras as _read

__all__ = ["attach_adapter", "load_adapter", "module_table"]


def _settings(
    config: OFTConfig, rows: int, b: int, in_features: int, key: str, source: Path
) -> AdapterSettings:
    if in_features % b != 0 or (not config.block_share and rows * b != in_features):
        raise InteropError(
            f"{source}: {key!r} holds {rows} block(s) of size {b} (shape {[rows, b * (b - 1) // 2]}), which "
            f"does not tile the module's in_features={in_features}"
        )
    return AdapterSettings(
        r=in_features // b,
        block_size=b,
        coft=config.coft,
        eps=config.eps,
        block_share=config.block_share,
        use_cayley_neumann=config.use_cayley_neumann,
        num_cayley_neumann_terms=config.num_cayley_neumann_terms,
        legacy_neumann=config.legacy_neumann,
        module_dropout=config.module_dropout,
    )


def _current_active(table: Mapping[str, tuple[ModulePath, Any]]) -> tuple[str, ...] | None:
    """The model's active adapters (those of its first OFT layer), or None when it has no OFT layer yet."""
    for _, m in table.values():
        if isinstance(m, OFTAdapters) and m.adapters:
            return m.active_adapters
    return None


def load_adapter(
    model: Any,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    activate: bool | None = None,
    rngs: nnx.Rngs | None = None,
    strict: bool = True,
    allow_symlinks: bool = False,
) -> list[str]:
    """Attach the PEFT OFT adapter at ``path`` to ``model`` (in place) under ``adapter_name``.

    OFT is applied to exactly the modules the file names (its config's ``target_modules`` are not re-matched),
    with each layer's block layout taken from its tensor. Biases saved with ``bias="oft_only"``/``"all"``
    overwrite the model's biases and become trainable (``OFTBias``), as PEFT marks them. Old file formats are
    read as ``read_adapter`` says (a PEFT 0.15 adapter is converted, never silently dropped).

    Args:
        model: any NNX model whose module paths match the adapter's module names.
        path: the adapter directory; a non-default adapter may be given as the save root plus ``adapter_name``
            (PEFT saves it in the subfolder ``path/<adapter_name>``).
        adapter_name: the name the adapter gets on each layer (``oft_R[adapter_name]``).
        activate: make the adapter the active one on every OFT layer; default: only when the model had no
            OFT adapter before (as ``PeftModel.from_pretrained``/``PeftModel.load_adapter``); otherwise newly
            wrapped layers keep the model's current active adapters (``oftjax.surgery.set_adapter`` switches).
        rngs: the randomness of training-time block dropout (``module_dropout > 0``); loading for inference
            (``model.eval()``) needs none.
        strict: refuse a file that lacks the tensor of a layer (linear or embedding) its config targets
            (PEFT would warn about missing adapter keys and leave that layer at its fresh initialization).
        allow_symlinks: follow symbolic links that stay inside ``path`` (``read_adapter``).

    Returns:
        The module paths the adapter was attached to, sorted.

    Raises:
        InteropError: a module named in the file is missing or of the wrong kind, a shape does not tile its
            layer, the adapter name exists on a layer, or the file is bad. The model is left unchanged.

    Example:
        >>> paths = load_adapter(model, "peft_adapter_dir")  # doctest: +SKIP
        >>> paths  # doctest: +SKIP
        ['lin0', 'lin1']
    """
    fmt.check_adapter_name(adapter_name)  # before anything is read
    config, tensors, _ = _read(path, adapter_name, allow_symlinks=allow_symlinks)
    return attach_adapter(
        model, config, tensors, adapter_name, activate=activate, rngs=rngs, strict=strict, source=Path(path)
    )


@dataclasses.dataclass(frozen=True)
class _Rotation:
    """One layer's rotation to attach: the module (wrapped or to wrap), its settings and tensor."""

    name: str
    path: ModulePath
    module: Any
    settings: AdapterSettings
    array: np.ndarray


@dataclasses.dataclass
class _Plan:
    """Everything ``attach_adapter`` writes, checked before the model is touched."""

    rotations: list[_Rotation] = dataclasses.field(default_factory=list)
    tables: list[tuple[Any, np.ndarray]] = dataclasses.field(default_factory=list)  # (nnx.Embed, table)
    biases: list[tuple[Any, np.ndarray]] = dataclasses.field(default_factory=list)  # (base module, bias)


def attach_adapter(
    model: Any,
    config: OFTConfig,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str = "default",
    *,
    activate: bool | None = None,
    rngs: nnx.Rngs | None = None,
    strict: bool = True,
    source: str | os.PathLike = "<tensors>",
) -> list[str]:
    """``load_adapter`` from memory: attach ``(config, PEFT-named tensors)`` (as ``read_adapter`` returns).

    Example:
        >>> config, tensors = read_adapter("peft_adapter_dir")  # doctest: +SKIP
        >>> attach_adapter(model, config, tensors, "default")  # doctest: +SKIP
        ['lin0', 'lin1']
    """
    source = Path(source)
    fmt.check_adapter_name(adapter_name)
    parsed = fmt.check_tensors(tensors, config, source)
    table = module_table(model)
    current = _current_active(table)
    plan = _plan(config, tensors, parsed, table, adapter_name, source)
    if strict:
        _check_no_missing_keys(config, table, {r.name for r in plan.rotations}, source)
    # Everything checked: now mutate the model.
    wrapped = _attach_rotations(model, plan.rotations, adapter_name, rngs)
    if activate is None:
        activate = current is None
    if activate:
        for _, layer in oft_layers(model):
            if layer.adapters:
                layer.active_adapters = (adapter_name,) if adapter_name in layer.adapters else ()
    else:
        for layer in wrapped.values():
            layer.active_adapters = tuple(current or ())
    for embed, array in plan.tables:
        embed.embedding[...] = jnp.asarray(array, dtype=embed.embedding[...].dtype)
    for base, array in plan.biases:
        base.bias = OFTBias(jnp.asarray(array, dtype=base.bias[...].dtype))
    return sorted(wrapped)


def _plan(
    config: OFTConfig,
    tensors: Mapping[str, np.ndarray],
    parsed: Mapping[str, fmt.ParsedKey],
    table: Mapping[str, tuple[ModulePath, Any]],
    adapter_name: str,
    source: Path,
) -> _Plan:
    """Check every tensor against the module it names (InteropError naming the key if one does not fit)."""
    plan = _Plan()
    for key, p in sorted(parsed.items()):
        if p.kind == "module_to_save":
            raise InteropError(
                f"{source}: {key!r}: modules_to_save ({list(config.modules_to_save or ())}) is not supported "
                "by load_adapter; only OFT rotations and biases are attached"
            )
        if p.module not in table:
            near = [m for m in table if m.endswith(p.module.rpartition(".")[2])][:5]
            raise InteropError(
                f"{source}: {key!r}: the model has no module {p.module!r}"
                + (f" (similar: {near})" if near else f" (modules: {list(table)[:8]})")
            )
        mpath, module = table[p.module]
        array = np.asarray(tensors[key])
        at = f"{source}: {key!r}"
        where = f"{at}: module {p.module!r}"
        if p.kind in fmt.ROTATION_KINDS:
            _check_rotation_target(module, p.kind == "oft_embedding_R", adapter_name, where)
            rows, n = array.shape
            settings = _settings(config, rows, fmt.block_size_of(n), _in_features(module), key, source)
            plan.rotations.append(_Rotation(p.module, mpath, module, settings, array))
        elif p.kind == "embedding_base":
            # PEFT loads this into the base embedding (set_peft_model_state_dict): so do we.
            plan.tables.append((_checked_embedding_base(module, array, at, p.module), array))
        else:
            plan.biases.append((_checked_bias_owner(module, array, at, p.module), array))
    return plan


def _check_rotation_target(module: Any, embed: bool, adapter_name: str, where: str) -> None:
    if embed and not is_adaptable_embedding(module):
        raise InteropError(f"{where} is a {type(module).__name__}, not an embedding (nnx.Embed)")
    if not embed and not is_adaptable_linear(module):
        what = (
            " (an embedding: PEFT names its rotation 'oft_embedding_R')"
            if is_adaptable_embedding(module)
            else ""
        )
        raise InteropError(f"{where} is a {type(module).__name__}, not a linear layer{what}")
    if isinstance(module, OFTAdapters) and adapter_name in module.adapters:
        raise InteropError(
            f"{where} already has an adapter named {adapter_name!r}; delete it or load under another "
            "adapter_name"
        )


def _checked_embedding_base(module: Any, array: np.ndarray, at: str, name: str) -> nnx.Embed:
    base = base_module(module)
    if not isinstance(base, nnx.Embed):
        raise InteropError(f"{at}: module {name!r} is not an embedding (nnx.Embed)")
    have = list(base.embedding[...].shape)
    if have != list(array.shape):
        raise InteropError(
            f"{at} has shape {list(array.shape)}; module {name!r} embedding is {have} (a resized vocabulary: "
            "resize the model's embedding first)"
        )
    return base


def _checked_bias_owner(module: Any, array: np.ndarray, at: str, name: str) -> Any:
    base = base_module(module)
    bias = getattr(base, "bias", None)
    if not isinstance(bias, nnx.Variable):
        raise InteropError(f"{at}: module {name!r} has no bias to load into")
    if list(bias[...].shape) != list(array.shape):
        raise InteropError(
            f"{at} has shape {list(array.shape)}; module {name!r} bias is {list(bias[...].shape)}"
        )
    return base


def _attach_rotations(
    model: Any, rotations: list[_Rotation], adapter_name: str, rngs: nnx.Rngs | None
) -> dict[str, OFTAdapters]:
    """Wrap (or reuse) each layer, add the adapter with the file's values; module name -> OFT layer."""
    wrapped: dict[str, OFTAdapters] = {}
    for rot in rotations:
        layer = as_oft_layer(rot.module)
        layer.add_adapter(
            adapter_name, rot.settings, init_weights=True, rngs=rngs, param_dtype=rot.array.dtype
        )
        layer.rotation_params[adapter_name][...] = jnp.asarray(rot.array)
        if layer is not rot.module:
            replace_module(model, rot.path, layer)
        wrapped[rot.name] = layer
    return wrapped


def _check_no_missing_keys(
    config: OFTConfig, table: Mapping[str, tuple[ModulePath, Any]], rotated: set[str], source: Path
) -> None:
    if config.target_modules is None:
        return  # PEFT's per-architecture default targets: nothing to compare against here
    expected = []
    for path, (key, module) in table.items():
        embed = is_adaptable_embedding(module)
        if not (embed or is_adaptable_linear(module)):
            continue
        if config.is_all_linear and (embed or key[-1] == "lm_head"):
            continue  # PEFT's "all-linear" never adapts embeddings or the output layer
        if config.is_target(path) and path not in rotated:
            expected.append((path, "oft_embedding_R" if embed else "oft_R"))
    if expected:
        keys = [f"{fmt.PEFT_PREFIX}{p}.{kind}.weight" for p, kind in expected[:5]]
        raise InteropError(
            f"{source}: missing tensor key(s) {keys}: the config's target_modules select {len(expected)} "
            "linear/embedding layer(s) of the model that the file has no rotation for (PEFT would leave them "
            "at a fresh init); "
            "fix the file, or pass strict=False to attach only the modules the file names"
        )


def _in_features(module: Any) -> int:
    """The rotated dimension (PEFT's ``in_features``; an embedding's ``embedding_dim``: its output)."""
    if isinstance(module, OFTAdapters):
        return int(module.in_features)
    return int(base_ops(module).in_features)
