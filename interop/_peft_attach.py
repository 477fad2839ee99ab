"""Attach PEFT OFT adapters to NNX models and save them back (``interop.peft.load_adapter``/``save_adapter``).

A model's module paths are its attribute names joined by dots, list indices as numbers
(``model.layers.0.self_attn.q_proj``): exactly PEFT's module names for a torch model built the same way. The
per-layer block layout comes from the tensor shapes (PEFT adjusts r/b per layer): ``b`` from
``n = b(b-1)/2`` and ``r = shape[0]`` (``in_features / b`` with ``block_share``). Layers are wrapped in
``oftjax.nn.OFTLinear`` (or get one more adapter if already wrapped).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from oftjax import oft
from oftjax.config import OFTConfig
from oftjax.nn import AdapterSettings, OFTBias, OFTLinear, base_kind

from . import _peft_format as fmt
from ._io import InteropError

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
        if isinstance(m, OFTLinear) and m.adapters:
            return m.active_adapters
    return None


def load_adapter(
    model: Any,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    activate: bool | None = None,
    rngs: nnx.Rngs | None = None,
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

    Returns:
        The module paths the adapter was attached to, sorted.

    Raises:
        InteropError: a module named in the file is missing or not a linear layer, a shape does not tile its
            layer, the adapter name exists on a layer, or the file is bad. The model is left unchanged.

    Example:
        >>> paths = load_adapter(model, "peft_adapter_dir")  # doctest: +SKIP
        >>> paths  # doctest: +SKIP
        ['lin0', 'lin1']
    """
    from .peft import _read

    config, tensors, _ = _read(path, adapter_name)
    return attach_adapter(
        model, config, tensors, adapter_name, activate=activate, rngs=rngs, source=Path(path)
    )


def attach_adapter(
    model: Any,
    config: OFTConfig,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str = "default",
    *,
    activate: bool | None = None,
    rngs: nnx.Rngs | None = None,
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
        if p.kind == "oft_embedding_R":
            raise InteropError(f"{source}: {key!r}: OFT on embeddings is not supported by oftjax.nn")
        if p.kind == "oft_R":
            if not (isinstance(module, OFTLinear) or _is_linear_like(module)):
                raise InteropError(
                    f"{source}: {key!r}: module {p.module!r} is a {type(module).__name__}, not a linear layer"
                )
            if isinstance(module, OFTLinear) and adapter_name in module.adapters:
                raise InteropError(
                    f"{source}: {key!r}: module {p.module!r} already has an adapter named {adapter_name!r}; "
                    "delete it or load under another adapter_name"
                )
            rows, n = array.shape
            in_features = int(module.in_features) if isinstance(module, OFTLinear) else _in_features(module)
            settings = _settings(config, rows, fmt.block_size_of(n), in_features, key, source)
            plans.append((p.module, mpath, module, settings, array))
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
    needs_rngs = config.module_dropout > 0
    if needs_rngs and rngs is None:
        raise InteropError(f"{source}: module_dropout={config.module_dropout} > 0 needs rngs=nnx.Rngs(...)")
    # Everything checked: now mutate the model.
    wrapped: dict[str, OFTLinear] = {}
    for name, mpath, module, settings, array in plans:
        layer = module if isinstance(module, OFTLinear) else OFTLinear(module)
        layer.add_adapter(adapter_name, settings, init_weights=True, rngs=rngs, param_dtype=array.dtype)
        layer.oft_R[adapter_name][...] = jnp.asarray(array)
        if layer is not module:
            _replace(model, mpath, layer)
        wrapped[name] = layer
    if activate:
        for _, m in module_table(model).values():
            if isinstance(m, OFTLinear) and m.adapters:
                m.active_adapters = (adapter_name,) if adapter_name in m.adapters else ()
    else:
        for layer in wrapped.values():
            layer.active_adapters = tuple(current or ())
    for name, module, array in bias_updates:
        target = wrapped.get(name, module)
        old = target.bias
        target.bias = OFTBias(jnp.asarray(array, dtype=old[...].dtype))
    return sorted(wrapped)


def _in_features(module: Any) -> int:
    kind = base_kind(module)
    if kind == "float":
        return int(module.kernel[...].shape[0])
    return int(module.weight.get_value().shape[1])


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


def _bias_mode(table: Mapping[str, tuple[PathKey, Any]], layers: Mapping[str, OFTLinear]) -> str:
    """PEFT's ``bias`` that saves exactly the biases made trainable (``OFTBias``) in the model."""
    trainable = {p for p, (_, m) in table.items() if isinstance(getattr(m, "bias", None), OFTBias)}
    with_bias = {p for p, m in layers.items() if getattr(m, "bias", None) is not None}
    if trainable and trainable <= set(layers):
        return "oft_only"
    if trainable and with_bias <= trainable:
        return "all"
    return "none"  # no trainable biases, or they belong to another adapter's layers


def _infer_config(layers: Mapping[str, OFTLinear], adapter_name: str, bias: str = "none") -> OFTConfig:
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


def _layout_mismatches(config: OFTConfig, layers: Mapping[str, OFTLinear], adapter_name: str) -> list[str]:
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
    config: OFTConfig, layers: Mapping[str, OFTLinear], table: Mapping, adapter_name: str
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
        if path not in layers and (_is_linear_like(module) or isinstance(module, OFTLinear)):
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


def collect_adapter(
    model: Any, adapter_name: str = "default", config: OFTConfig | None = None
) -> tuple[OFTConfig, dict[str, np.ndarray]]:
    """The ``(config, PEFT-named tensors)`` of one adapter of an NNX model (what ``save_adapter`` writes).

    Without ``config``, one is inferred from the layers (``target_modules`` = their full paths; ``bias`` from
    which biases are trainable ``OFTBias``: "oft_only" if only this adapter's layers' ones, "all" if those
    and others, else "none"). A given config
    is checked: it must select exactly the layers carrying the adapter and reproduce each layer's layout.
    """
    table = module_table(model)
    layers = {
        path: m for path, (_, m) in table.items() if isinstance(m, OFTLinear) and adapter_name in m.adapters
    }
    if not layers:
        found = sorted({n for _, m in table.values() if isinstance(m, OFTLinear) for n in m.adapters})
        raise InteropError(f"the model has no OFT adapter named {adapter_name!r} (adapters found: {found})")
    if config is None:
        config = _infer_config(layers, adapter_name, _bias_mode(table, layers))
    else:
        _check_config(config, layers, table, adapter_name)
    tensors: dict[str, np.ndarray] = {}
    for path, layer in layers.items():
        tensors[f"{fmt.PEFT_PREFIX}{path}.oft_R.weight"] = np.asarray(layer.oft_R[adapter_name][...])
    if config.bias in ("oft_only", "all"):
        for path, layer in layers.items():
            if getattr(layer, "bias", None) is not None:
                tensors[f"{fmt.PEFT_PREFIX}{path}.base_layer.bias"] = np.asarray(layer.bias[...])
    if config.bias == "all":
        for path, (_, module) in table.items():
            bias = getattr(module, "bias", None)
            if path not in layers and isinstance(bias, nnx.Variable) and bias[...] is not None:
                tensors[f"{fmt.PEFT_PREFIX}{path}.bias"] = np.asarray(bias[...])
    return config, tensors


def save_adapter(
    model: Any,
    path: str | os.PathLike,
    adapter_name: str = "default",
    force: bool = False,
    *,
    config: OFTConfig | None = None,
) -> Path:
    """Write one adapter of ``model`` as a PEFT adapter directory (``PeftModel.from_pretrained`` loads it with
    no missing or unexpected keys). A non-default ``adapter_name`` goes to ``path/<adapter_name>``, as PEFT
    saves.

    Args:
        model: an NNX model with ``OFTLinear`` layers carrying ``adapter_name``.
        path: the save directory.
        adapter_name: which adapter.
        force: overwrite existing adapter files.
        config: the OFTConfig to write (checked against the model); inferred when None.

    Returns:
        The directory written.

    Example:
        >>> save_adapter(model, "peft_adapter_dir")  # doctest: +SKIP
    """
    from .peft import write_adapter

    fmt.check_adapter_name(adapter_name)
    config, tensors = collect_adapter(model, adapter_name, config)
    # As PEFT's save_pretrained: inference_mode is saved True; the file is ours, so claim our PEFT version
    # (a legacy-series adapter keeps its pre-0.18 version so PEFT warns).
    version = config.peft_version if config.legacy_neumann else None
    config = dataclasses.replace(config, inference_mode=True, peft_version=version)
    return write_adapter(path, config, tensors, adapter_name=adapter_name, force=force)
