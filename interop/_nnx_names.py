"""PEFT's and HF's names for an NNX model's modules and base tensors: the one place ``base_layer`` is mapped.

Module names are the dotted paths of ``oftjax.nn.find_modules`` (attributes, list indices as numbers), which
lists an OFT layer but not the base layer inside it: ``model.layers.0.self_attn.q_proj`` names the
``OFTLinear`` there, exactly as PEFT names its ``oft.layer.Linear``.

An OFT layer holds its base as the child ``base_layer``, so the base tensors sit one level down in the NNX
state (``q_proj.base_layer.kernel``). The outside names differ:

* an HF checkpoint has no ``base_layer``: ``<module>.weight`` / ``<module>.bias`` are the base's tensors;
* a PEFT adapter names them ``<module>.base_layer.weight`` / ``<module>.base_layer.bias``.

Both resolve through ``base_module``: the module that holds ``<module>``'s base tensors. Within it, HF's
``weight`` is ``nnx.Linear``'s ``kernel`` (transposed), ``nnx.Embed``'s ``embedding``, or a quantized layer's
``weight``; ``bias`` is ``bias``.
"""

from __future__ import annotations

from typing import Any

from oftjax.nn import ModulePath, OFTAdapters, find_modules, path_str

__all__ = ["base_module", "module_table"]


def module_table(model: Any) -> dict[str, tuple[ModulePath, Any]]:
    """Every module below ``model`` by its PEFT/HF module name (root excluded), in model order.

    Example:
        >>> from flax import nnx
        >>> from oftjax.nn import OFTLinear
        >>> model = nnx.Dict(q_proj=OFTLinear(nnx.Linear(4, 4, rngs=nnx.Rngs(0))))
        >>> list(module_table(model))  # no 'q_proj.base_layer'
        ['q_proj']
    """
    return {path_str(path): (path, module) for path, module in find_modules(model)}


def base_module(module: Any) -> Any:
    """The module holding the base tensors of ``module`` (HF ``<module>.weight``, PEFT
    ``<module>.base_layer.weight``): an OFT layer's ``base_layer``, any other module itself.

    Example:
        >>> from flax import nnx
        >>> from oftjax.nn import OFTLinear
        >>> lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        >>> base_module(OFTLinear(lin)) is lin and base_module(lin) is lin
        True
    """
    return module.base_layer if isinstance(module, OFTAdapters) else module
