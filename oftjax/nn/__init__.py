"""Thin Flax NNX modules: OFT variable types, frozen float/int8/4-bit linears, the OFT wrapper layers."""

from oftjax.nn._adapters import OFTAdapters as OFTAdapters
from oftjax.nn._base import base_kind as base_kind
from oftjax.nn._native_rotate import native_info as rotation_native_info
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
    "Linear4bit",
    "Linear8bit",
    "OFTAdapters",
    "OFTBias",
    "OFTEmbed",
    "OFTLinear",
    "OFTParam",
    "QuantWeight",
    "base_kind",
    "rotation_native_info",
]
