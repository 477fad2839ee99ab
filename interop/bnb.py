"""bnb layer tensors as serialized in state dicts <-> ``oftjax.quant`` pytrees (numpy only, no torch).

One quantized linear layer is a handful of tensors under its module prefix (bitsandbytes 0.50.2,
``Linear4bit._save_to_state_dict`` + ``QuantState.as_dict(packed=True)``, ``Linear8bitLt``'s;
docs/bitsandbytes-formats.md, "Serialized layout"):

  * 4-bit: ``weight`` (packed bytes in the quant_storage dtype, ``[ceil(n/2)/itemsize, 1]``),
    ``weight.absmax``, ``weight.quant_map`` (the 16-entry NF4/FP4 code), with double quantization also
    ``weight.nested_absmax`` and ``weight.nested_quant_map`` (the 256-entry dynamic code), and
    ``weight.quant_state.bitsandbytes__<nf4|fp4>``: the UTF-8 bytes of ``json.dumps`` of ``{"quant_type",
    "blocksize", "dtype", "shape"[, "nested_blocksize", "nested_dtype", "nested_offset"]}`` in that key order.
  * int8: ``weight`` (CB, int8 ``[out, in]``), ``SCB`` (float32 ``[out]``), ``weight_format``
    (uint8 scalar 0).

``from_state_dict`` and ``to_state_dict`` are exact inverses on what bitsandbytes writes: same keys, dtypes
and bytes, the JSON blob included (``json.dumps`` of the same dict in the same order; ``nested_offset`` is the
float32 offset printed as a Python float, which round-trips exactly). The code tables are not kept in the
pytree: they are checked bit for bit against ``oftjax.quant.NF4/FP4/DYNAMIC`` on reading and written back
from them.

Refused, with the reason: the layouts bitsandbytes writes after its AVX512-BF16 CPU repacking (2-D or bf16
``absmax``, ``nested_dtype`` bfloat16: they reload silently but dequantize to garbage or lossily;
docs/bitsandbytes-formats.md, "bitsandbytes CPU defects"), legacy tiled int8 ``weight_format`` != 0
("Serialized layout" there), non-standard code tables, shapes that disagree with the JSON, unknown quant types
or JSON keys.

Leaves may be numpy arrays, jax arrays, or ``LazyTensor``s of an open safetensors file (the checkpoint
readers use those to stream): only the small tensors (code tables, JSON, offset) are read to validate a layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from interop._io import InteropError, parse_json
from oftjax.quant import BLOCKSIZES, DYNAMIC, FP4, NESTED_BLOCKSIZE, NF4, FourBitWeight, Int8Weight

__all__ = ["from_state_dict", "to_state_dict", "layer_kind", "dtype_from_name", "dtype_to_name"]

QUANT_STATE = "weight.quant_state.bitsandbytes__"
_CODES = {"nf4": NF4, "fp4": FP4}
_JSON_KEYS = (
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
)
_4BIT_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
# torch dtype names as bitsandbytes writes them (``str(torch.dtype).strip("torch.")``).
_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
    "uint8": np.dtype(np.uint8),
    "int8": np.dtype(np.int8),
}


def dtype_from_name(name: str, *, where: str = "") -> np.dtype:
    """numpy dtype of a torch dtype name as written in bnb JSON / HF config (``"bfloat16"`` -> ml_dtypes)."""
    if isinstance(name, str) and name.startswith("torch."):
        name = name[len("torch.") :]
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise InteropError(f"{where}unsupported dtype {name!r}: expected one of {sorted(_DTYPES)}") from None


def dtype_to_name(dtype: Any) -> str:
    """The torch dtype name of a numpy dtype (``ml_dtypes.bfloat16`` -> ``"bfloat16"``)."""
    dt = np.dtype(dtype)
    for name, d in _DTYPES.items():
        if d == dt:
            return name
    raise InteropError(f"dtype {dt} has no bitsandbytes/torch name (expected one of {sorted(_DTYPES)})")


def _norm_prefix(prefix: str) -> str:
    return prefix if prefix == "" or prefix.endswith(".") else prefix + "."


def _load(x: Any) -> np.ndarray:
    load = getattr(x, "load", None)
    return load() if callable(load) else np.asarray(x)


def layer_kind(keys: Any, prefix: str) -> str | None:
    """``"4bit"``, ``"int8"`` or None: which bnb layer the tensor names under ``prefix`` describe."""
    p = _norm_prefix(prefix)
    keys = set(keys)
    if any(k.startswith(p + QUANT_STATE) for k in keys):
        return "4bit"
    if p + "SCB" in keys:
        return "int8"
    return None


def _quant_state_key(keys: set[str], p: str) -> str:
    found = sorted(k for k in keys if k.startswith(p + QUANT_STATE))
    if len(found) != 1:
        raise InteropError(
            f"layer {p[:-1]!r}: expected exactly one {p}{QUANT_STATE}<nf4|fp4> tensor, "
            f"found {found or 'none'}"
        )
    return found[0]


def _require(sd: Mapping[str, Any], key: str) -> Any:
    if key not in sd:
        raise InteropError(f"missing tensor key {key!r}")
    return sd[key]


def _check(cond: bool, key: str, what: str) -> None:
    if not cond:
        raise InteropError(f"tensor {key!r}: {what}")


_MAX_QUANT_STATE = 4096  # bytes: bitsandbytes writes about 200


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_quant_state(tensor: Any, key: str) -> dict[str, Any]:
    _check(
        np.dtype(tensor.dtype) == np.uint8 and len(tensor.shape) == 1 and tensor.shape[0] <= _MAX_QUANT_STATE,
        key,
        f"expected uint8 [L <= {_MAX_QUANT_STATE}] JSON bytes, got {tensor.dtype}{list(tensor.shape)}",
    )
    try:
        qs = parse_json(_load(tensor).tobytes(), "quant_state JSON")
    except InteropError as e:
        raise InteropError(f"tensor {key!r}: corrupt {e}") from None
    _check(isinstance(qs, dict), key, "quant_state JSON is not an object")
    unknown = sorted(set(qs) - set(_JSON_KEYS))
    _check(not unknown, key, f"unknown quant_state JSON key(s) {unknown} (known: {list(_JSON_KEYS)})")
    missing = [k for k in _JSON_KEYS[:4] if k not in qs]
    _check(not missing, key, f"quant_state JSON lacks {missing}")
    return qs


_REPACKED = (
    "bitsandbytes wrote this layer after its AVX512-BF16 CPU repacking (docs/bitsandbytes-formats.md, "
    '"bitsandbytes CPU defects"), '
)
_RESAVE = (
    "; re-save it from a model that never ran an eval forward on the CPU, or with "
    "support_avx512bf16_for_cpu=False"
)


def _check_quant_state(qs: Mapping[str, Any], key: str) -> tuple[str, int, tuple[int, ...], np.dtype]:
    """``(quant_type, blocksize, shape, dtype)`` of a parsed quant_state JSON, each checked."""
    quant_type = qs["quant_type"]
    _check(
        isinstance(quant_type, str) and quant_type in _CODES,
        key,
        f"unknown quant_type {quant_type!r}: expected 'nf4' or 'fp4'",
    )
    _check(key.endswith("__" + quant_type), key, f"key suffix disagrees with quant_type {quant_type!r}")
    blocksize = qs["blocksize"]
    _check(
        _is_int(blocksize) and blocksize in BLOCKSIZES,
        key,
        f"blocksize {blocksize!r}: expected one of {BLOCKSIZES}",
    )
    shape = qs["shape"]
    _check(
        isinstance(shape, list) and 1 <= len(shape) <= 64 and all(_is_int(s) and s > 0 for s in shape),
        key,
        f"shape {shape!r:.80} is not a list of positive ints",
    )
    return quant_type, blocksize, tuple(shape), dtype_from_name(qs["dtype"], where=f"tensor {key!r}: ")


def _check_packed(sd: Mapping[str, Any], p: str, shape: tuple[int, ...]) -> Any:
    """The packed ``weight``: ``ceil(n/2)`` bytes viewed as the quant_storage dtype, shape ``[.., 1]``."""
    key = p + "weight"
    weight = _require(sd, key)
    storage = np.dtype(weight.dtype)
    nbytes = -(-math.prod(shape) // 2)
    _check(
        nbytes % storage.itemsize == 0 and tuple(weight.shape) == (nbytes // storage.itemsize, 1),
        key,
        f"{storage}{list(weight.shape)} disagrees with the quant_state shape {list(shape)} "
        f"(expected [{nbytes}/{storage.itemsize}, 1] packed values)",
    )
    return weight


def _check_code_table(sd: Mapping[str, Any], key: str, expected: np.ndarray, what: str) -> None:
    table = _require(sd, key)
    _check(
        tuple(table.shape) == expected.shape,
        key,
        f"not bitsandbytes' {what} (float32 {list(expected.shape)}, got {list(table.shape)})",
    )
    table = _load(table)
    _check(
        table.dtype == np.float32 and table.shape == expected.shape and table.tobytes() == expected.tobytes(),
        key,
        f"not bitsandbytes' {what} (float32 {list(expected.shape)}, bit for bit)",
    )


def _check_absmax(sd: Mapping[str, Any], p: str, n: int, blocksize: int) -> Any:
    """``weight.absmax``: one entry per block, 1-D (its dtype depends on double quantization)."""
    key = p + "weight.absmax"
    absmax = _require(sd, key)
    _check(
        len(absmax.shape) == 1,
        key,
        f"shape {list(absmax.shape)} is not 1-D: {_REPACKED}which transposes absmax and dequantizes to "
        f"garbage{_RESAVE}",
    )
    nb = -(-n // blocksize)
    _check(absmax.shape[0] == nb, key, f"length {absmax.shape[0]} != ceil({n}/{blocksize}) = {nb} blocks")
    return absmax


def _read_nested(
    sd: Mapping[str, Any], p: str, qs: Mapping[str, Any], qs_key: str, absmax: Any
) -> tuple[Any, np.ndarray]:
    """``(nested_absmax, offset)`` of a double-quantized layer, after checking its JSON fields and tensors."""
    missing = [k for k in ("nested_blocksize", "nested_dtype", "nested_offset") if k not in qs]
    _check(not missing, qs_key, f"quant_state JSON lacks {missing}")
    _check(
        qs["nested_dtype"] == "float32",
        qs_key,
        f"nested_dtype {qs['nested_dtype']!r}: only 'float32' is supported; 'bfloat16' means {_REPACKED}a "
        f"lossy re-quantization of absmax{_RESAVE}",
    )
    _check(
        _is_int(qs["nested_blocksize"]) and qs["nested_blocksize"] == NESTED_BLOCKSIZE,
        qs_key,
        f"nested_blocksize {qs['nested_blocksize']!r}: expected {NESTED_BLOCKSIZE}",
    )
    off = qs["nested_offset"]
    # bitsandbytes prints a float32 as a Python float: it must convert back exactly (1e308 would be inf); it
    # is the mean of the blocks' absmax (docs/bitsandbytes-formats.md, "Double quantization"), so never < 0
    _check(
        isinstance(off, (int, float))
        and not isinstance(off, bool)
        and 0 <= off <= float(np.finfo(np.float32).max)
        and float(np.float32(off)) == off,
        qs_key,
        f"nested_offset {off!r}: expected a finite float32 value >= 0 (the mean of the blocks' absmax)",
    )
    am_key = p + "weight.absmax"
    _check(
        np.dtype(absmax.dtype) == np.uint8, am_key, f"expected uint8 codes (double quant), got {absmax.dtype}"
    )
    na_key = p + "weight.nested_absmax"
    nested_absmax = _require(sd, na_key)
    nb2 = -(-absmax.shape[0] // NESTED_BLOCKSIZE)
    _check(
        np.dtype(nested_absmax.dtype) == np.float32 and tuple(nested_absmax.shape) == (nb2,),
        na_key,
        f"expected float32 [{nb2}], got {nested_absmax.dtype}{list(nested_absmax.shape)}",
    )
    _check_code_table(sd, p + "weight.nested_quant_map", DYNAMIC, "dynamic map")
    return nested_absmax, np.asarray(off, dtype=np.float32)  # float64 repr of a float32: the cast is exact


def _check_not_nested(sd: Mapping[str, Any], p: str, absmax: Any) -> None:
    for suffix in ("weight.nested_absmax", "weight.nested_quant_map"):
        _check(p + suffix not in sd, p + suffix, "present but the quant_state JSON has no nested_* fields")
    _check(
        np.dtype(absmax.dtype) == np.float32,
        p + "weight.absmax",
        f"dtype {absmax.dtype}: expected float32; a bf16 absmax means {_REPACKED}and it dequantizes to "
        f"garbage{_RESAVE}",
    )


def _read_4bit(sd: Mapping[str, Any], p: str) -> FourBitWeight:
    qs_key = _quant_state_key(set(sd.keys()), p)
    qs = _parse_quant_state(sd[qs_key], qs_key)
    quant_type, blocksize, shape, dtype = _check_quant_state(qs, qs_key)
    weight = _check_packed(sd, p, shape)
    _check_code_table(sd, p + "weight.quant_map", _CODES[quant_type], f"standard {quant_type} code table")
    absmax = _check_absmax(sd, p, math.prod(shape), blocksize)
    if any(k in qs for k in ("nested_offset", "nested_blocksize", "nested_dtype")):
        nested_absmax, offset = _read_nested(sd, p, qs, qs_key, absmax)
    else:
        _check_not_nested(sd, p, absmax)
        nested_absmax = offset = None
    return FourBitWeight(
        packed=weight,
        absmax=absmax,
        nested_absmax=nested_absmax,
        offset=offset,
        shape=shape,
        dtype=dtype,
        blocksize=blocksize,
        quant_type=quant_type,
    )


def _read_int8(sd: Mapping[str, Any], p: str, dtype: Any) -> Int8Weight:
    wkey, skey, fkey = p + "weight", p + "SCB", p + "weight_format"
    cb = _require(sd, wkey)
    scb = _require(sd, skey)
    _check(
        np.dtype(cb.dtype) == np.int8 and len(cb.shape) == 2, wkey, f"expected int8 [out, in], got {cb.dtype}"
    )
    _check(
        np.dtype(scb.dtype) == np.float32 and tuple(scb.shape) == (cb.shape[0],),
        skey,
        f"expected float32 [{cb.shape[0]}] (one scale per row of {wkey!r}), got {scb.dtype}{list(scb.shape)}",
    )
    if fkey in sd:  # bnb < 0.42 did not write it; absent means "row"
        _check(
            math.prod(sd[fkey].shape) == 1, fkey, f"expected one integer, got shape {list(sd[fkey].shape)}"
        )
        fmt = _load(sd[fkey])
        _check(fmt.size == 1 and np.issubdtype(fmt.dtype, np.integer), fkey, "expected one integer")
        _check(
            int(fmt.reshape(())) == 0,
            fkey,
            f"value {int(fmt.reshape(()))}: legacy tiled int8 layouts (col32/col_turing/col_ampere) are not "
            "supported, as in bitsandbytes 0.50.2; only 0 (row-major CB) is",
        )
    return Int8Weight(CB=cb, SCB=scb, dtype=np.dtype(dtype) if dtype is not None else np.dtype(np.float32))


def from_state_dict(sd: Mapping[str, Any], prefix: str, *, dtype: Any = None) -> Int8Weight | FourBitWeight:
    """Read one bnb-quantized layer from a state dict without passing through float.

    Args:
      sd: tensor name -> array (numpy, jax or ``LazyTensor``); may hold other layers' tensors too.
      prefix: the layer's module path, e.g. ``"model.layers.0.self_attn.q_proj"`` (a trailing dot is
      optional). dtype: int8 only: the original weight dtype (bnb does not store it; HF checkpoints keep it in
        config.json ``dtype``), the default output dtype of ``dequantize``. Default float32. 4-bit layers
        read it from JSON.

    Returns:
      ``Int8Weight`` or ``FourBitWeight`` whose leaves are the state dict's arrays (not copied).

    Raises:
      InteropError: missing keys, shapes disagreeing with the JSON, unknown quant_type / JSON keys,
        non-standard code tables, or a layout bitsandbytes writes after its CPU repacking (the message says
        why).

    Example:
      >>> import jax
      >>> from oftjax import quant
      >>> q = quant.quantize_4bit(np.ones((4, 64), np.float32), quant_type="nf4", compress_statistics=True)
      >>> sd = to_state_dict(q, "model.layers.0.self_attn.q_proj")
      >>> back = from_state_dict(sd, "model.layers.0.self_attn.q_proj")
      >>> back.quant_type, back.blocksize, back.shape, back.compress_statistics
      ('nf4', 64, (4, 64), True)
      >>> all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(back)))
      True
    """
    p = _norm_prefix(prefix)
    kind = layer_kind(sd.keys(), p)
    if kind == "4bit":
        return _read_4bit(sd, p)
    if kind == "int8":
        return _read_int8(sd, p, dtype)
    stray = [p + s for s in (*_4BIT_SUFFIXES, "weight_format") if p + s in sd]
    if stray:
        raise InteropError(
            f"missing tensor key: {stray[0]!r} is present but neither {p}{QUANT_STATE}<nf4|fp4> nor {p}SCB is"
        )
    raise InteropError(
        f"no bitsandbytes layer under {p[:-1]!r}: neither {p}{QUANT_STATE}<nf4|fp4> nor {p}SCB"
    )


def _quant_state_blob(q: FourBitWeight) -> np.ndarray:
    qs: dict[str, Any] = {
        "quant_type": q.quant_type,
        "blocksize": q.blocksize,
        "dtype": dtype_to_name(q.dtype),
        "shape": list(q.shape),
    }
    if q.nested_absmax is not None:
        qs.update(
            nested_blocksize=NESTED_BLOCKSIZE,
            nested_dtype="float32",
            nested_offset=float(np.asarray(_load(q.offset), dtype=np.float32)),
        )
    return np.frombuffer(json.dumps(qs).encode("utf-8"), dtype=np.uint8).copy()


def to_entries(q: Int8Weight | FourBitWeight, prefix: str) -> dict[str, Any]:
    """Like ``to_state_dict`` but leaves the big tensors as they are (numpy, jax or ``LazyTensor``)."""
    p = _norm_prefix(prefix)
    if isinstance(q, Int8Weight):
        return {p + "weight": q.CB, p + "SCB": q.SCB, p + "weight_format": np.array(0, dtype=np.uint8)}
    if not isinstance(q, FourBitWeight):
        raise TypeError(f"expected Int8Weight or FourBitWeight, got {type(q).__name__}")
    if q.quant_type not in _CODES:
        raise InteropError(f"layer {p[:-1]!r}: unknown quant_type {q.quant_type!r}")
    out = {
        p + "weight": q.packed,
        p + "weight.absmax": q.absmax,
        p + "weight.quant_map": _CODES[q.quant_type].copy(),
    }
    if q.nested_absmax is not None:
        out[p + "weight.nested_absmax"] = q.nested_absmax
        out[p + "weight.nested_quant_map"] = DYNAMIC.copy()
    out[p + QUANT_STATE + q.quant_type] = _quant_state_blob(q)
    return out


def to_state_dict(q: Int8Weight | FourBitWeight, prefix: str) -> dict[str, np.ndarray]:
    """Serialize one quantized layer exactly as bitsandbytes' ``_save_to_state_dict`` does (numpy arrays).

    Args:
      q: an ``Int8Weight`` or ``FourBitWeight`` (numpy or jax leaves).
      prefix: the layer's module path (a trailing dot is optional).

    Returns:
      tensor name -> numpy array, the inverse of ``from_state_dict`` (same keys, dtypes and bytes).

    Example:
      >>> from oftjax import quant
      >>> sd = to_state_dict(quant.quantize_int8(np.ones((2, 3), np.float32)), "model.layers.0.mlp.down_proj")
      >>> {k: (v.dtype.name, v.shape) for k, v in sd.items()}  # doctest: +NORMALIZE_WHITESPACE
      {'model.layers.0.mlp.down_proj.weight': ('int8', (2, 3)),
       'model.layers.0.mlp.down_proj.SCB': ('float32', (2,)),
       'model.layers.0.mlp.down_proj.weight_format': ('uint8', ())}
    """
    return {k: np.asarray(_load(v)) for k, v in to_entries(q, prefix).items()}
