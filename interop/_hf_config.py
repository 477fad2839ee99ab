"""The ``quantization_config`` of an HF config.json for bitsandbytes checkpoints: validation and construction.

Keys and defaults follow transformers 5.24 ``BitsAndBytesConfig.to_dict()``
(``utils/quantization_config.py``); docs/bitsandbytes-formats.md, "Serialized layout".
"""

from __future__ import annotations

import math
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


_BOOL_KEYS = (
    "load_in_4bit",
    "load_in_8bit",
    "_load_in_4bit",
    "_load_in_8bit",
    "bnb_4bit_use_double_quant",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
)
_COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def _check_types(qc: dict[str, Any], pre: str) -> None:
    """Every known key's value has its type (transformers writes these exact types), named when not."""
    for key in _BOOL_KEYS:
        if key in qc and not isinstance(qc[key], bool):
            raise InteropError(f"{pre}.{key} {qc[key]!r:.80}: expected true or false")
    threshold = qc.get("llm_int8_threshold", 6.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise InteropError(f"{pre}.llm_int8_threshold {threshold!r:.80}: expected a finite number")
    skip = qc.get("llm_int8_skip_modules")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
        raise InteropError(
            f"{pre}.llm_int8_skip_modules {skip!r:.80}: expected null or a list of module names"
        )
    for key in ("bnb_4bit_quant_type", "bnb_4bit_quant_storage", "bnb_4bit_compute_dtype"):
        if qc.get(key) is not None and not isinstance(qc[key], str):
            raise InteropError(f"{pre}.{key} {qc[key]!r:.80}: expected a string")
    for plain, private in (("load_in_4bit", "_load_in_4bit"), ("load_in_8bit", "_load_in_8bit")):
        if plain in qc and private in qc and qc[plain] != qc[private]:
            raise InteropError(f"{pre}: {plain}={qc[plain]} disagrees with {private}={qc[private]}")


def validate_quantization_config(qc: Any, *, where: str = CONFIG) -> dict[str, Any]:
    """Check a ``quantization_config`` dict and return its normalized essentials.

    Returns:
      ``{"kind": "4bit" | "int8", "quant_type", "use_double_quant", "quant_storage", "compute_dtype",
      "threshold", "has_fp16_weight", "skip_modules"}`` (4-bit fields are None for int8; ``skip_modules`` a
      list or None). ``has_fp16_weight``: the 8-bit projections are stored float and bitsandbytes quantizes
      them at every forward (``check_weights_match_config`` refuses quantized leaves then).

    Raises:
      InteropError: unknown keys (named), a value of the wrong type, another quant_method, both or neither of
        4/8-bit, or options this library does not implement (unknown quant types, storages or compute
        dtypes).
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
    _check_types(qc, pre)
    four = qc.get("load_in_4bit", qc.get("_load_in_4bit", False))
    eight = qc.get("load_in_8bit", qc.get("_load_in_8bit", False))
    if four == eight:
        raise InteropError(f"{pre}: exactly one of load_in_4bit / load_in_8bit must be true")
    out: dict[str, Any] = {
        "kind": "4bit" if four else "int8",
        "threshold": qc.get("llm_int8_threshold", 6.0),
        "has_fp16_weight": bool(qc.get("llm_int8_has_fp16_weight", False)),
        "skip_modules": qc.get("llm_int8_skip_modules"),
    }
    if four:
        qt = qc.get("bnb_4bit_quant_type", "fp4")
        if qt not in ("nf4", "fp4"):
            raise InteropError(f"{pre}.bnb_4bit_quant_type {qt!r}: expected 'nf4' or 'fp4'")
        storage = qc.get("bnb_4bit_quant_storage", "uint8") or "uint8"
        if storage not in _STORAGES:
            raise InteropError(f"{pre}.bnb_4bit_quant_storage {storage!r}: expected one of {_STORAGES}")
        compute = qc.get("bnb_4bit_compute_dtype") or "float32"
        if compute.removeprefix("torch.") not in _COMPUTE_DTYPES:
            raise InteropError(f"{pre}.bnb_4bit_compute_dtype {compute!r}: expected one of {_COMPUTE_DTYPES}")
        out.update(
            quant_type=qt,
            use_double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            quant_storage=bnb.dtype_from_name(storage),
            compute_dtype=bnb.dtype_from_name(compute, where=f"{pre}: "),
        )
    else:
        out.update(quant_type=None, use_double_quant=None, quant_storage=None, compute_dtype=None)
    return out


# config.json keys with one meaning in every transformers config (``PretrainedConfig`` and its subclasses),
# checked wherever they appear: a positive int, a positive finite number, a boolean or a string.
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim", "sliding_window")
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
_MAX_INT = 2**31 - 1  # sizes beyond int32: no model has them, and shape arithmetic overflows
_MAX_LAYERS = 1024  # each layer is built in Python: more than any published decoder (a few hundred at most)
_MAX_FLOAT32 = 3.4028234663852886e38  # the model computes in float32 at most: larger is infinite there
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
_STRINGS = ("model_type", "hidden_act")
_OPTIONAL_STRINGS = ("dtype", "torch_dtype")


def check_model_config(config: Mapping[str, Any], *, where: str = CONFIG) -> None:
    """Type- and range-check the architecture keys of a config.json (those present), naming the key.

    Example:
      >>> check_model_config({"rms_norm_eps": -1.0}, where="ckpt/config.json")
      Traceback (most recent call last):
      interop._io.InteropError: ckpt/config.json: rms_norm_eps -1.0: expected a positive finite number
    """

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    for key, value in config.items():
        if key in _POSITIVE_INTS or (key in _OPTIONAL_POSITIVE_INTS and value is not None):
            limit = _MAX_LAYERS if key == "num_hidden_layers" else _MAX_INT
            if not is_int(value) or not 1 <= value <= limit:
                raise InteropError(f"{where}: {key} {value!r:.80}: expected an integer in 1 .. {limit}")
        elif key in _POSITIVE_NUMBERS:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not 0 < value <= _MAX_FLOAT32:
                raise InteropError(f"{where}: {key} {value!r:.80}: expected a positive finite number")
        elif key in _BOOLS and not isinstance(value, bool):
            raise InteropError(f"{where}: {key} {value!r:.80}: expected true or false")
        elif (key in _STRINGS or (key in _OPTIONAL_STRINGS and value is not None)) and not isinstance(
            value, str
        ):
            raise InteropError(f"{where}: {key} {value!r:.80}: expected a string")


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
            if norm["has_fp16_weight"]:
                raise InteropError(
                    f"{where}: {path} is bnb-quantized ({kind}) but quantization_config."
                    "llm_int8_has_fp16_weight=true says the weights are stored float"
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
