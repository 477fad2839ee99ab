"""Attach PEFT OFT adapters to NNX models (``interop.peft.load_adapter`` / ``attach_adapter``).

A model's module paths are its attribute names joined by dots, list indices as numbers
(``model.layers.0.self_attn.q_proj``): exactly PEFT's module names for a torch model built the same way. The
per-layer block layout comes from the tensor shapes (PEFT adjusts r/b per layer): ``b`` from
``n = b(b-1)/2`` and ``r = shape[0]`` (``in_features / b`` with ``block_share``). Layers named by
``oft_R.weight`` are wrapped in ``oftjax.nn.OFTLinear``, embeddings (``nnx.Embed``) named by
``oft_embedding_R.weight`` in ``oftjax.nn.OFTEmbed`` (or get one more adapter if already wrapped). The base
table PEFT saves next to a targeted input embedding (``<module>.base_layer.weight``) is loaded into the
embedding, as PEFT does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from oftjax.config import OFTConfig
from oftjax.nn import AdapterSettings, OFTAdapters, OFTBias, OFTEmbed, OFTLinear, base_kind

from . import _peft_format as fmt
from ._io import InteropError
from ._peft_files import read_adapter_with_extras as _read

PathKey = tuple[str | int, ...]


def _dotted(path: PathKey) -> str:
    return ".".join(str(k) for k in path)


def module_table(model: Any) -> dict[str, tuple[PathKey, Any]]:
    """Every NNX module below ``model`` by dotted path (PEFT's module naming), root excluded."""
    table: dict[str, tuple[PathKey, Any]] = {}
    for path, node in nnx.iter_graph(model):
        if path and isinstance(node, nnx.Module):
            table.setdefault(_dotted(path), (tuple(path), node))
    return table


def _node_at(model: Any, path: PathKey) -> Any:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) or isinstance(node, (nnx.Dict, dict)) else getattr(node, key)
    return node


def _replace(model: Any, path: PathKey, new: Any) -> None:
    parent, key = _node_at(model, path[:-1]), path[-1]
    if isinstance(key, int) or isinstance(parent, (nnx.Dict, dict)):
        parent[key] = new
    else:
        setattr(parent, key, new)


def _is_linear_like(module: Any) -> bool:
    try:
        base_kind(module)
    except TypeError:
        return False
    return True


def _is_embed_like(module: Any) -> bool:
    return isinstance(module, OFTEmbed | nnx.Embed)


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


def _current_active(table: Mapping[str, tuple[PathKey, Any]]) -> tuple[str, ...] | None:
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
        rngs: needed only when ``module_dropout > 0`` (training-time block dropout).
        strict: refuse a file that lacks the tensor of a layer (linear or embedding) its config targets
            (PEFT would warn about missing adapter keys and leave that layer at its fresh initialization).

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
    config, tensors, _ = _read(path, adapter_name)
    return attach_adapter(
        model, config, tensors, adapter_name, activate=activate, rngs=rngs, strict=strict, source=Path(path)
    )


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
    if activate is None:
        activate = current is None
    plans: list[tuple[str, PathKey, Any, AdapterSettings, np.ndarray]] = []
    bias_updates: list[tuple[str, Any, np.ndarray]] = []
    table_updates: list[tuple[Any, np.ndarray]] = []
    for key, p in sorted(parsed.items()):
        if p.kind == "module_to_save":
            raise InteropError(
                f"{source}: {key!r}: modules_to_save ({list(config.modules_to_save or ())}) is not supported "
                "by "
                "load_adapter; only OFT rotations and biases are attached"
            )
        if p.module not in table:
            near = [m for m in table if m.endswith(p.module.rpartition(".")[2])][:5]
            raise InteropError(
                f"{source}: {key!r}: the model has no module {p.module!r}"
                + (f" (similar: {near})" if near else f" (modules: {list(table)[:8]})")
            )
        mpath, module = table[p.module]
        array = np.asarray(tensors[key])
        if p.kind in fmt.ROTATION_KINDS:
            embed = p.kind == "oft_embedding_R"
            if embed and not _is_embed_like(module):
                raise InteropError(
                    f"{source}: {key!r}: module {p.module!r} is a {type(module).__name__}, not an embedding "
                    "(nnx.Embed)"
                )
            if not embed and not (isinstance(module, OFTLinear) or _is_linear_like(module)):
                what = (
                    "an embedding: PEFT names its rotation 'oft_embedding_R'"
                    if _is_embed_like(module)
                    else ""
                )
                raise InteropError(
                    f"{source}: {key!r}: module {p.module!r} is a {type(module).__name__}, not a linear layer"
                    + (f" ({what})" if what else "")
                )
            if isinstance(module, OFTAdapters) and adapter_name in module.adapters:
                raise InteropError(
                    f"{source}: {key!r}: module {p.module!r} already has an adapter named {adapter_name!r}; "
                    "delete it or load under another adapter_name"
                )
            rows, n = array.shape
            in_features = int(module.in_features) if isinstance(module, OFTAdapters) else _in_features(module)
            settings = _settings(config, rows, fmt.block_size_of(n), in_features, key, source)
            plans.append((p.module, mpath, module, settings, array))
        elif p.kind == "embedding_base":
            # PEFT loads this into the base embedding (set_peft_model_state_dict): so do we.
            table_var = getattr(module, "embedding", None)
            if not _is_embed_like(module) or not isinstance(table_var, nnx.Variable):
                raise InteropError(f"{source}: {key!r}: module {p.module!r} is not an embedding (nnx.Embed)")
            if tuple(table_var[...].shape) != tuple(array.shape):
                raise InteropError(
                    f"{source}: {key!r} has shape {list(array.shape)}; module {p.module!r} embedding is "
                    f"{list(table_var[...].shape)} (a resized vocabulary: resize the model's embedding first)"
                )
            table_updates.append((module, array))
        else:
            bias = getattr(module, "bias", None)
            if not isinstance(bias, nnx.Variable):
                raise InteropError(f"{source}: {key!r}: module {p.module!r} has no bias to load into")
            if tuple(bias[...].shape) != tuple(array.shape):
                raise InteropError(
                    f"{source}: {key!r} has shape {list(array.shape)}; module {p.module!r} bias is "
                    f"{list(bias[...].shape)}"
                )
            bias_updates.append((p.module, module, array))
    if strict:
        _check_no_missing_keys(config, table, {name for name, *_ in plans}, adapter_name, source)
    needs_rngs = config.module_dropout > 0
    if needs_rngs and rngs is None:
        raise InteropError(f"{source}: module_dropout={config.module_dropout} > 0 needs rngs=nnx.Rngs(...)")
    # Everything checked: now mutate the model.
    wrapped: dict[str, OFTAdapters] = {}
    for name, mpath, module, settings, array in plans:
        if isinstance(module, OFTAdapters):
            layer = module
        else:
            layer = OFTEmbed(module) if _is_embed_like(module) else OFTLinear(module)
        layer.add_adapter(adapter_name, settings, init_weights=True, rngs=rngs, param_dtype=array.dtype)
        layer.rotation_params[adapter_name][...] = jnp.asarray(array)
        if layer is not module:
            _replace(model, mpath, layer)
        wrapped[name] = layer
    if activate:
        for _, m in module_table(model).values():
            if isinstance(m, OFTAdapters) and m.adapters:
                m.active_adapters = (adapter_name,) if adapter_name in m.adapters else ()
    else:
        for layer in wrapped.values():
            layer.active_adapters = tuple(current or ())
    for module, array in table_updates:  # the wrapper shares the base's variable: either one works
        module.embedding[...] = jnp.asarray(array, dtype=module.embedding[...].dtype)
    for name, module, array in bias_updates:
        target = wrapped.get(name, module)
        old = target.bias
        target.bias = OFTBias(jnp.asarray(array, dtype=old[...].dtype))
    return sorted(wrapped)


def _check_no_missing_keys(
    config: OFTConfig,
    table: Mapping[str, tuple[PathKey, Any]],
    rotated: set[str],
    adapter_name: str,
    source: Path,
) -> None:
    if config.target_modules is None:
        return  # PEFT's per-architecture default targets: nothing to compare against here
    expected = []
    for path, (key, module) in table.items():
        embed = _is_embed_like(module)
        if not (embed or isinstance(module, OFTLinear) or _is_linear_like(module)):
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
    if isinstance(module, nnx.Embed):  # PEFT's in_features of an embedding: embedding_dim (rotated output)
        return int(module.features)
    kind = base_kind(module)
    if kind == "float":
        return int(module.kernel[...].shape[0])
    return int(module.weight.get_value().shape[1])
