"""Thin Flax NNX modules: OFT variable types, frozen float/int8/4-bit linears, the OFT wrapper layers.

Also the base-layer protocol the wrappers use (``BaseLayer``, ``LinearBase``, ``base_ops``) and the graph
surgery every model edit goes through (``find_modules``, ``module_at``, ``replace_module``).
"""

from oftjax.nn._adapters import OFTAdapters as OFTAdapters
from oftjax.nn._base import BaseLayer as BaseLayer
from oftjax.nn._base import LinearBase as LinearBase
from oftjax.nn._base import base_ops as base_ops
from oftjax.nn._base import is_linear_base as is_linear_base
from oftjax.nn._graph import ModulePath as ModulePath
from oftjax.nn._graph import find_modules as find_modules
from oftjax.nn._graph import module_at as module_at
from oftjax.nn._graph import path_str as path_str
from oftjax.nn._graph import replace_module as replace_module
from oftjax.nn._oft_embed import OFTEmbed as OFTEmbed
from oftjax.nn._oft_linear import OFTLinear as OFTLinear
from oftjax.nn._quant_linear import Linear4bit as Linear4bit
from oftjax.nn._quant_linear import Linear8bit as Linear8bit
from oftjax.nn._settings import AdapterSettings as AdapterSettings
from oftjax.nn._variables import OFTBias as OFTBias
from oftjax.nn._variables import OFTParam as OFTParam
from oftjax.nn._variables import QuantWeight as QuantWeight

__all__ = [
    "AdapterSettings",
    "BaseLayer",
    "Linear4bit",
    "Linear8bit",
    "LinearBase",
    "ModulePath",
    "OFTAdapters",
    "OFTBias",
    "OFTEmbed",
    "OFTLinear",
    "OFTParam",
    "QuantWeight",
    "base_ops",
    "find_modules",
    "is_linear_base",
    "module_at",
    "path_str",
    "replace_module",
]
