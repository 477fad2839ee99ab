"""The ``quantization_config`` of an HF config.json for bitsandbytes checkpoints: validation and construction.

Keys and defaults follow transformers 5.24 ``BitsAndBytesConfig.to_dict()``
(``utils/quantization_config.py``); docs/bitsandbytes-formats.md, "Serialized layout".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from interop import bnb
from interop._io import InteropError
from oftjax.quant import FourBitWeight, Int8Weight

CONFIG = "config.json"
# BitsAndBytesConfig.to_dict() keys (transformers 5.24, utils/quantization_config.py).
QC_KEYS = frozenset(
    {
        "quant_method",
        "load_in_4bit",
        "load_in_8bit",
        "_load_in_4bit",
        "_load_in_8bit",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_quant_storage",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "llm_int8_enable_fp32_cpu_offload",
        "llm_int8_has_fp16_weight",
        "llm_int8_skip_modules",
        "llm_int8_threshold",
    }
)
_STORAGES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")


def validate_quantization_config(qc: Any, *, where: str = CONFIG) -> dict[str, Any]:
    """Check a ``quantization_config`` dict and return its normalized essentials.

    Returns:
      ``{"kind": "4bit" | "int8", "quant_type", "use_double_quant", "quant_storage", "compute_dtype",
      "threshold"}`` (4-bit fields are None for int8).

    Raises:
      InteropError: unknown keys (named), another quant_method, both or neither of 4/8-bit, or options this
        library does not implement (``llm_int8_has_fp16_weight``, unknown quant types or storages).
    """
    pre = f"{where}: quantization_config"
    if not isinstance(qc, dict):
        raise InteropError(f"{pre}: expected an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise InteropError(f"{pre}.quant_method {method!r}: only 'bitsandbytes' checkpoints are supported")
    unknown = sorted(set(qc) - QC_KEYS)
    if unknown:
        raise InteropError(f"{pre}: unknown key(s) {unknown} (known: {sorted(QC_KEYS)})")
    four = bool(qc.get("load_in_4bit", qc.get("_load_in_4bit", False)))
    eight = bool(qc.get("load_in_8bit", qc.get("_load_in_8bit", False)))
    if four == eight:
        raise InteropError(f"{pre}: exactly one of load_in_4bit / load_in_8bit must be true")
    if qc.get("llm_int8_has_fp16_weight"):
        raise InteropError(f"{pre}.llm_int8_has_fp16_weight=true (float weights, no SCB) is not supported")
    out: dict[str, Any] = {"kind": "4bit" if four else "int8", "threshold": qc.get("llm_int8_threshold", 6.0)}
    if four:
        qt = qc.get("bnb_4bit_quant_type", "fp4")
        if qt not in ("nf4", "fp4"):
            raise InteropError(f"{pre}.bnb_4bit_quant_type {qt!r}: expected 'nf4' or 'fp4'")
        storage = qc.get("bnb_4bit_quant_storage", "uint8") or "uint8"
        if storage not in _STORAGES:
            raise InteropError(f"{pre}.bnb_4bit_quant_storage {storage!r}: expected one of {_STORAGES}")
        out.update(
            quant_type=qt,
            use_double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            quant_storage=bnb.dtype_from_name(storage),
            compute_dtype=bnb.dtype_from_name(
                qc.get("bnb_4bit_compute_dtype") or "float32", where=f"{pre}: "
            ),
        )
    else:
        out.update(quant_type=None, use_double_quant=None, quant_storage=None, compute_dtype=None)
    return out


def bnb_quantization_config(
    kind: str,
    *,
    quant_type: str = "nf4",
    use_double_quant: bool = False,
    quant_storage: str = "uint8",
    compute_dtype: str = "float32",
    threshold: float = 6.0,
) -> dict[str, Any]:
    """The ``quantization_config`` dict transformers writes for a bnb checkpoint (``kind`` "4bit" or "int8").

    Example:
      >>> bnb_quantization_config("4bit", quant_type="nf4")["bnb_4bit_quant_type"]
      'nf4'
    """
    if kind not in ("4bit", "int8"):
        raise ValueError(f"kind {kind!r}: expected '4bit' or 'int8'")
    four = kind == "4bit"
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": quant_storage,
        "bnb_4bit_quant_type": quant_type if four else "fp4",
        "bnb_4bit_use_double_quant": bool(use_double_quant) if four else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": threshold,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


def check_weights_match_config(
    config: Mapping[str, Any], weights: Mapping[str, Mapping[str, Any]], *, where: str
) -> None:
    """Every quantized leaf agrees with ``config["quantization_config"]`` (kind, quant type, double quant,
    storage); quantized leaves need one. Raises InteropError naming the module."""
    qc = config.get("quantization_config")
    norm = validate_quantization_config(qc, where=where) if qc is not None else None
    for module, params in weights.items():
        for name, leaf in params.items():
            if not isinstance(leaf, (Int8Weight, FourBitWeight)):
                continue
            path = f"{module}.{name}" if module else name
            if name != "weight":
                raise InteropError(
                    f"{where}: {path}: bitsandbytes layers keep their quantized tensor as 'weight'"
                )
            kind = "int8" if isinstance(leaf, Int8Weight) else "4bit"
            if norm is None:
                raise InteropError(
                    f"{where}: {path} is bnb-quantized ({kind}) but config has no quantization_config"
                )
            if kind != norm["kind"]:
                raise InteropError(f"{where}: {path} is {kind} but quantization_config says {norm['kind']}")
            if kind == "4bit":
                got = (leaf.quant_type, leaf.compress_statistics, np.dtype(leaf.packed.dtype))
                want = (norm["quant_type"], norm["use_double_quant"], norm["quant_storage"])
                if got != want:
                    raise InteropError(
                        f"{where}: {path} is (quant_type, double_quant, storage) = {got} but "
                        f"quantization_config says {want}"
                    )
