"""Graph surgery on NNX models: find modules by a predicate with their paths, replace the module at a path.

A path is the tuple of keys from the root to a module: attribute names, ``nnx.Dict``/dict keys (strings) and
``nnx.List``/list indices (ints), so ``("model", "layers", 0, "self_attn", "q_proj")``. Joined by dots it is
the module's name, ``"model.layers.0.self_attn.q_proj"``: exactly PEFT's and HF's module names for a torch
model built the same way. One walk and one replace serve ``apply_oft``, ``quantize_model`` and the PEFT / HF
interop, so attributes, indices and dict keys are handled alike everywhere.

The base layer inside an OFT layer (``OFTLinear.base_layer``) is not a module of the model by default: the
OFT layer stands for it, and its path is the module name PEFT uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any

from flax import nnx

from oftjax.nn._adapters import OFTAdapters

__all__ = ["ModulePath", "find_modules", "module_at", "path_str", "replace_module"]

ModulePath = tuple[str | int, ...]


def path_str(path: Sequence[str | int]) -> str:
    """The dotted name of a path (``("layers", 0, "lin")`` -> ``"layers.0.lin"``)."""
    return ".".join(str(k) for k in path)


def _sort_key(path: Sequence[str | int]) -> tuple[tuple[int, Any], ...]:
    # Parents before children, list indices numeric ("layers.2" before "layers.10").
    return tuple((0, k) if isinstance(k, int) else (1, str(k)) for k in path)


def _outside_oft_layers(module: Any) -> bool:
    return not isinstance(module, OFTAdapters)


def find_modules(
    model: Any,
    predicate: Callable[[Any], bool] | None = None,
    *,
    enter: Callable[[Any], bool] = _outside_oft_layers,
) -> list[tuple[ModulePath, Any]]:
    """``(path, module)`` for every module below ``model`` (root excluded) that ``predicate`` accepts.

    In model order: parents before their children, attributes sorted by name, list indices numeric. A module
    shared at several paths is listed once.

    Args:
      model: any NNX module.
      predicate: which modules to list (default: all).
      enter: whether to look below a module; by default everything but OFT layers (their base layer is
        part of them, not a module of the model).

    Example:
      >>> from flax import nnx
      >>> class Block(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs) for _ in range(3)])
      >>> [path_str(p) for p, _ in find_modules(Block(nnx.Rngs(0)), lambda m: isinstance(m, nnx.Linear))]
      ['layers.0', 'layers.1', 'layers.2']
    """
    found: list[tuple[ModulePath, Any]] = []
    closed: ModulePath | None = None  # the last module not entered; its subtree follows it in sorted order
    nodes = [(tuple(p), m) for p, m in nnx.iter_graph(model) if p and isinstance(m, nnx.Module)]
    for path, module in sorted(nodes, key=lambda pm: _sort_key(pm[0])):
        if closed is not None and path[: len(closed)] == closed:
            continue
        if not enter(module):
            closed = path
        if predicate is None or predicate(module):
            found.append((path, module))
    return found


def _keys(node: Any, path: str | Sequence[str | int]) -> list[tuple[Any, str | int]]:
    """``(parent, key)`` for each step of ``path``; a dotted string's digits index sequences."""
    steps = []
    parts = path.split(".") if isinstance(path, str) else list(path)
    for part in parts:
        key: str | int = part
        if isinstance(part, str) and part.isdigit() and isinstance(node, Sequence):
            key = int(part)
        steps.append((node, key))
        node = _child(node, key)
    return steps


def _child(node: Any, key: str | int) -> Any:
    if isinstance(node, Mapping | Sequence):
        return node[key]
    return getattr(node, key)


def module_at(model: Any, path: str | Sequence[str | int]) -> Any:
    """The module at ``path`` (a tuple of keys or a dotted name); KeyError, IndexError or AttributeError
    when there is none.

    Example:
      >>> from flax import nnx
      >>> model = nnx.Dict(layers=nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0))]))
      >>> module_at(model, "layers.0").out_features
      3
    """
    steps = _keys(model, path)
    if not steps:
        return model
    parent, key = steps[-1]
    return _child(parent, key)


def replace_module(model: Any, path: str | Sequence[str | int], new: Any) -> None:
    """Put ``new`` in place of the module at ``path`` (an attribute, list index or dict key of its parent).

    Raises:
      ValueError: an empty path (the root cannot be replaced in place).
      TypeError: the parent is immutable (a tuple).

    Example:
      >>> from flax import nnx
      >>> model = nnx.Dict(layers=nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0))]))
      >>> replace_module(model, ("layers", 0), nnx.Linear(2, 5, rngs=nnx.Rngs(0)))
      >>> model["layers"][0].out_features
      5
    """
    steps = _keys(model, path)
    if not steps:
        raise ValueError("replace_module: the path is empty; the root module cannot be replaced in place")
    parent, key = steps[-1]
    if isinstance(parent, MutableMapping | MutableSequence):
        parent[key] = new
    elif isinstance(parent, Mapping | Sequence):
        raise TypeError(
            f"replace_module: {path_str([k for _, k in steps])} sits in an immutable "
            f"{type(parent).__name__}; hold such modules in an nnx.List or nnx.Dict"
        )
    else:
        setattr(parent, key, new)
