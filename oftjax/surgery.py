"""Put OFT adapters into any NNX model: target selection, wrapping, adapter management.

``apply_oft`` is PEFT's ``get_peft_model`` / ``add_adapter`` for OFT on an NNX model: it walks the module
graph (``oftjax.nn.find_modules``: attributes, ``nnx.List`` / ``nnx.Dict`` / lists), names every module by
its dotted path with list indices as numbers (``"model.layers.0.self_attn.q_proj"``, PEFT's module names),
and wraps each selected linear (``nnx.Linear``, ``Linear8bit``, ``Linear4bit``, any ``oftjax.nn.LinearBase``)
in an ``OFTLinear`` and each selected ``nnx.Embed`` in an ``OFTEmbed`` (PEFT's ``Embedding``: the output is
rotated; embeddings are adapted only when ``target_modules`` names them, never by "all-linear"). The wrapper
takes the module's place and holds it as ``base_layer``: the module path stays ``...q_proj`` and the base's
state moves below it (``...q_proj.base_layer.kernel``), as in PEFT.

Training selects by type: ``nnx.Optimizer(model, optax.adamw(1e-3), wrt=OFTParam)`` trains the rotations (and
the biases that ``OFTConfig.bias`` made trainable, which become ``OFTBias``, a subclass of ``OFTParam``); the
frozen quantized weights are ``QuantWeight`` variables, which no ``Param`` filter selects.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from oftjax.nn._adapters import OFTAdapters
from oftjax.nn._base import is_linear_base
from oftjax.nn._graph import ModulePath, find_modules, path_str, replace_module
from oftjax.nn._oft_embed import OFTEmbed
from oftjax.nn._oft_linear import OFTLinear
from oftjax.nn._settings import AdapterSettings
from oftjax.nn._variables import OFTBias, OFTParam

__all__ = [
    "OFTParam",
    "apply_oft",
    "as_oft_layer",
    "delete_adapter",
    "disable_adapters",
    "is_adaptable_embedding",
    "is_adaptable_linear",
    "oft_layers",
    "set_adapter",
    "trainable_count",
]


def is_adaptable_linear(module: Any) -> bool:
    """An ``OFTLinear`` already, or a layer it can wrap (``oftjax.nn.LinearBase``)."""
    return isinstance(module, OFTLinear) or is_linear_base(module)


def is_adaptable_embedding(module: Any) -> bool:
    """An ``OFTEmbed`` already, or an ``nnx.Embed`` it can wrap."""
    return isinstance(module, OFTEmbed | nnx.Embed)


def oft_layers(model: nnx.Module) -> Iterator[tuple[str, OFTAdapters]]:
    """``(dotted path, layer)`` for every OFT layer (``OFTLinear``, ``OFTEmbed``) in the model.

    Example:
      >>> from flax import nnx
      >>> list(oft_layers(nnx.Linear(2, 2, rngs=nnx.Rngs(0))))
      []
    """
    for path, module in find_modules(model, lambda m: isinstance(m, OFTAdapters)):
        yield path_str(path), module


def _current_active(model: nnx.Module) -> tuple[str, ...] | None:
    for _, layer in oft_layers(model):
        return layer.active_adapters
    return None


def apply_oft(
    model: nnx.Module,
    config: Any,
    adapter_name: str = "default",
    *,
    rngs: nnx.Rngs | None = None,
    rotate: str = "auto",
    param_dtype: Any = jnp.float32,
) -> list[str]:
    """Add an OFT adapter to every layer of ``model`` that ``config`` targets; return the matched paths.

    Layers are wrapped in ``OFTLinear``, embeddings (``nnx.Embed``, only when named by ``target_modules``) in
    ``OFTEmbed`` (or, when already wrapped, get one more named adapter). Per layer the
    ``(r, block_size)`` follow PEFT's rule, adjusting a block size that does not divide ``in_features`` with
    PEFT's warning. As in PEFT, the first adapter of a model is active; a later one is added inactive (use
    ``set_adapter``).

    Args:
      model: any NNX module.
      config: an ``oftjax.OFTConfig`` (``target_modules`` must be set).
      adapter_name: the adapter's name (PEFT's "default").
      rngs: needed for ``init_weights=False`` (``N(0, 0.1)`` init) and ``module_dropout > 0``.
      rotate: "auto" | "input" | "weight", see ``OFTLinear``.
      param_dtype: dtype of the rotation parameters (PEFT upcasts adapters to fp32 by default).

    Returns:
      The dotted paths of the adapted layers, in model order (attributes sorted, list indices numeric).

    Raises:
      ValueError: nothing matches (the message names the patterns and some candidate paths), or the adapter
        name already exists on a matched layer.
      TypeError: a targeted module is neither a supported linear layer nor an ``nnx.Embed``.

    Example:
      >>> from flax import nnx
      >>> from oftjax.config import OFTConfig
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.lin0 = nnx.Linear(10, 20, rngs=rngs)
      ...         self.lin1 = nnx.Linear(20, 2, rngs=rngs)
      >>> model = MLP(nnx.Rngs(0))
      >>> apply_oft(model, OFTConfig(r=2, oft_block_size=0, target_modules=["lin0"]))
      ['lin0']
    """
    if config.modules_to_save:
        warnings.warn(
            f"OFTConfig.modules_to_save={list(config.modules_to_save)} is not supported by oftjax.apply_oft: "
            "those modules are neither adapted nor made trainable",
            stacklevel=2,
        )
    matched = _targets(model, config)
    for path, module in matched:
        if isinstance(module, OFTAdapters) and adapter_name in module.adapters:
            raise ValueError(
                f"adapter {adapter_name!r} already exists on {path_str(path)}; pick another adapter_name or "
                "delete_adapter first"
            )
    active = _current_active(model)
    for path, module in matched:
        layer = as_oft_layer(module, rotate=rotate)
        settings = AdapterSettings.from_config(config, layer.in_features)
        layer.add_adapter(
            adapter_name,
            settings,
            init_weights=bool(config.init_weights),
            rngs=rngs,
            param_dtype=param_dtype,
            activate=active is None,
        )
        if active is not None:
            layer.active_adapters = active
        if layer is not module:
            replace_module(model, path, layer)
    _mark_biases(model, config.bias, [m for _, m in oft_layers(model)])
    return [path_str(p) for p, _ in matched]


def _targets(model: nnx.Module, config: Any) -> list[tuple[ModulePath, Any]]:
    """The modules ``config`` selects, in model order; TypeError/ValueError as ``apply_oft`` says."""
    matched: list[tuple[ModulePath, Any]] = []
    candidates: list[str] = []
    for path, module in find_modules(model):
        linear, embed = is_adaptable_linear(module), is_adaptable_embedding(module)
        name = path_str(path)
        if linear or embed:
            candidates.append(name)
        if config.is_all_linear and (not linear or path[-1] == "lm_head"):
            continue  # PEFT's "all-linear" skips non-linear modules (embeddings too) and the output layer
        if not config.is_target(name):
            continue
        if not (linear or embed):
            raise TypeError(
                f"Target module {name} ({type(module).__name__}) is not supported. Currently, only "
                "nnx.Linear, oftjax.nn.Linear8bit, oftjax.nn.Linear4bit (or any oftjax.nn.LinearBase) and "
                "nnx.Embed are supported."
            )
        matched.append((path, module))
    if not matched:
        raise ValueError(
            f"Target modules {_describe_targets(config)} not found in the base model. Candidate linear/"
            f"embedding layers: {candidates[:8]}{' ...' if len(candidates) > 8 else ''}. Please check the "
            "target modules and try again."
        )
    return matched


def as_oft_layer(module: Any, *, rotate: str = "auto") -> OFTAdapters:
    """The OFT layer for a module: itself when already one, else a new ``OFTEmbed`` (``nnx.Embed``) or
    ``OFTLinear`` holding it. The caller puts the result in the module's place (``replace_module``).

    Example:
      >>> from flax import nnx
      >>> type(as_oft_layer(nnx.Embed(4, 2, rngs=nnx.Rngs(0)))).__name__
      'OFTEmbed'
    """
    if isinstance(module, OFTAdapters):
        return module
    if isinstance(module, nnx.Embed):
        return OFTEmbed(module)
    return OFTLinear(module, rotate=rotate)


def _describe_targets(config: Any) -> str:
    t = config.target_modules
    return repr(t) if isinstance(t, str) else str(sorted(t))


def _mark_biases(model: nnx.Module, bias: str, oft_modules: list[OFTAdapters]) -> None:
    """PEFT's ``bias``: "all" makes every bias trainable, "oft_only" the biases of OFT layers' bases."""
    if bias == "none":
        return
    if bias not in ("all", "oft_only"):
        raise ValueError(f"OFTConfig.bias must be 'none', 'all' or 'oft_only'; got {bias!r}")
    if bias == "all":
        modules = [model, *(m for _, m in find_modules(model, enter=lambda m: True))]
    else:
        modules = [m.base_layer for m in oft_modules]
    for module in modules:
        for name, value in list(vars(module).items()):
            is_bias = name == "bias" if bias == "oft_only" else "bias" in name
            if is_bias and isinstance(value, nnx.Param) and not isinstance(value, OFTParam):
                # Same value and metadata (e.g. sharding names); only the variable type changes.
                setattr(module, name, OFTBias(value[...], **value.get_metadata()))


def set_adapter(model: nnx.Module, adapter_names: str | Sequence[str]) -> None:
    """Make these adapters active on every OFT layer, applied in the given order (PEFT's ``set_adapter``).

    A layer without one of the names skips it. Raises ValueError if a name exists on no layer.
    """
    names = (adapter_names,) if isinstance(adapter_names, str) else tuple(adapter_names)
    layers = [layer for _, layer in oft_layers(model)]
    known = {n for layer in layers for n in layer.adapters}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"unknown adapter(s) {missing}; the model has {sorted(known)}")
    for layer in layers:
        layer.active_adapters = names


def delete_adapter(model: nnx.Module, adapter_name: str) -> None:
    """Remove an adapter from every layer that has it (ValueError if none has it or it is merged)."""
    found = False
    for _, layer in oft_layers(model):
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
            found = True
    if not found:
        raise ValueError(f"adapter {adapter_name!r} not found in the model")


@contextlib.contextmanager
def disable_adapters(model: nnx.Module) -> Iterator[None]:
    """Inside the context every OFT layer runs its base only (merged layers are unmerged first, as PEFT).

    Example:
      >>> from flax import nnx
      >>> with disable_adapters(nnx.Linear(2, 2, rngs=nnx.Rngs(0))):
      ...     pass
    """
    with contextlib.ExitStack() as stack:
        for _, layer in oft_layers(model):
            stack.enter_context(layer.disable_adapters())
        yield


def trainable_count(model: nnx.Module, wrt: Any = OFTParam) -> int:
    """Number of scalars the optimizer filter ``wrt`` selects (default: rotations and trainable biases)."""
    leaves = nnx.state(model, wrt)
    return int(sum(v[...].size for _, v in nnx.to_flat_state(leaves)))
