"""The JAX checkpoint format for (quantized) weights, and conversion from/to HF directories.

A JAX checkpoint is a directory holding
  * ``oftjax_checkpoint.json``: ``{"format": "oftjax-checkpoint", "format_version": 1, "config": <the source
    config.json>, "modules": {module_path: {param_name: spec}}}`` with one spec per leaf:
      - ``{"kind": "array", "tensor": "<module>.<param>"}``
      - ``{"kind": "int8", "dtype": "bfloat16", "tensors": {"CB": "<module>.<param>.CB", "SCB": ...}}``
      - ``{"kind": "4bit", "quant_type": "nf4", "blocksize": 64, "shape": [out, in], "dtype": "bfloat16",
        "tensors": {"packed": ..., "absmax": ...[, "nested_absmax": ..., "offset": ...]}}``
    i.e. the static metadata of ``oftjax.quant.Int8Weight`` / ``FourBitWeight`` and the names of their leaves;
  * ``weights.safetensors``: every leaf under its name (the ``Int8Weight``/``FourBitWeight`` field names,
    bytes as bitsandbytes stores them: ``packed`` in the quant_storage dtype, ``offset`` a float32 scalar);
  * any other files of the source directory (tokenizer, generation_config.json...), copied verbatim.
Reading validates everything a bnb checkpoint read validates (the layers go through ``interop.bnb``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from interop import bnb
from interop._hf_checkpoint import (
    CONFIG,
    DEFAULT_MAX_SHARD_SIZE,
    Weights,
    check_weights_match_config,
    copy_extra_files,
    extra_files_of,
    materialize,
    parse_size,
    progress_bar,
    read_checkpoint,
    write_checkpoint,
)
from interop._hf_config import check_model_config, validate_quantization_config
from interop._hf_shapes import check_known_architecture
from interop._io import InteropError, output_dir, read_json
from interop._paths import Root
from interop._safetensors import SafetensorsFile, total_nbytes, write_safetensors
from oftjax.quant import FourBitWeight, Int8Weight

META = "oftjax_checkpoint.json"
DATA = "weights.safetensors"
FORMAT = "oftjax-checkpoint"
FORMAT_VERSION = 1
_META_KEYS = {"format", "format_version", "config", "modules"}


def _spec_and_tensors(module: str, name: str, leaf: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    path = f"{module}.{name}" if module else name
    if isinstance(leaf, Int8Weight):
        t = {"CB": leaf.CB, "SCB": leaf.SCB}
        spec = {"kind": "int8", "dtype": bnb.dtype_to_name(leaf.dtype)}
    elif isinstance(leaf, FourBitWeight):
        t = {"packed": leaf.packed, "absmax": leaf.absmax}
        if leaf.nested_absmax is not None:
            t.update(nested_absmax=leaf.nested_absmax, offset=leaf.offset)
        spec = {
            "kind": "4bit",
            "quant_type": leaf.quant_type,
            "blocksize": leaf.blocksize,
            "shape": list(leaf.shape),
            "dtype": bnb.dtype_to_name(leaf.dtype),
        }
    else:
        return {"kind": "array", "tensor": path}, {path: leaf}
    names = {f: f"{path}.{f}" for f in t}
    spec["tensors"] = names
    return spec, {names[f]: v for f, v in t.items()}


def write_jax_checkpoint(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    weights: Weights,
    *,
    force: bool = False,
    progress: bool = False,
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Write ``(config, weights)`` (as ``read_checkpoint`` returns them) as a JAX checkpoint directory.

    Args:
      path: the output directory; must not exist unless ``force``.
      config: the source config.json (needs a bnb ``quantization_config`` when weights are quantized).
      weights: ``{module_path: {param_name: leaf}}``; lazy leaves are copied file to file.
      force: replace an existing ``path``.
      progress: show a tqdm bar (bytes written).
      extra_files: output name -> file to copy verbatim (tokenizer files...).

    Example:
      >>> import tempfile
      >>> weights = {"lm_head": {"weight": np.ones((2, 3), np.float32)}}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = write_jax_checkpoint(Path(tmp) / "jax", {"architectures": ["Tiny"]}, weights)
      ...     sorted(p.name for p in path.iterdir())
      ['oftjax_checkpoint.json', 'weights.safetensors']
    """
    path = Path(path)
    check_weights_match_config(config, weights, where=str(path / META))
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Any] = {}
    for module, params in weights.items():
        for name, leaf in params.items():
            spec, t = _spec_and_tensors(module, name, leaf)
            clash = set(t) & set(tensors)
            if clash:
                raise InteropError(f"{path / META}: tensor name(s) {sorted(clash)} produced twice")
            modules.setdefault(module, {})[name] = spec
            tensors.update(t)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": dict(config), "modules": modules}
    with output_dir(path, force=force) as tmp:
        with progress_bar(total_nbytes(tensors.values()), progress, path.name) as bar:
            write_safetensors(tmp / DATA, tensors, metadata={"format": FORMAT}, on_bytes=bar.update)
        try:
            text = json.dumps(meta, indent=2)
        except TypeError as e:
            raise InteropError(f"{path / META}: config is not JSON-serializable ({e})") from e
        (tmp / META).write_text(text + "\n")
        copy_extra_files(tmp, extra_files or {})
    return path


_SPEC_KEYS = {
    "array": {"kind", "tensor"},
    "int8": {"kind", "dtype", "tensors"},
    "4bit": {"kind", "quant_type", "blocksize", "shape", "dtype", "tensors"},
}


def _scalar_offset(offset: Any) -> np.ndarray | None:
    if offset is None:
        return None
    offset = offset.load()
    if offset.dtype != np.float32 or offset.shape != () or not np.isfinite(offset):
        raise InteropError(f"offset: {offset.dtype}{list(offset.shape)}: expected a finite float32 scalar")
    return offset


def _field(spec: Mapping[str, Any], key: str, check: Any, expected: str) -> Any:
    value = spec.get(key)
    if not check(value):
        raise InteropError(f"{key} {value!r:.80}: expected {expected}")
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _quantized(kind: str, spec: Mapping[str, Any], lazy: Mapping[str, Any]) -> Int8Weight | FourBitWeight:
    """The ``Int8Weight`` / ``FourBitWeight`` a spec describes, over its lazily read leaves."""
    dtype = bnb.dtype_from_name(_field(spec, "dtype", lambda x: isinstance(x, str), "a dtype name"))
    if kind == "int8":
        if set(lazy) != {"CB", "SCB"}:
            raise InteropError(f"int8 leaves {sorted(lazy)} != ['CB', 'SCB']")
        return Int8Weight(CB=lazy["CB"], SCB=lazy["SCB"], dtype=dtype)
    if set(lazy) not in ({"packed", "absmax"}, {"packed", "absmax", "nested_absmax", "offset"}):
        raise InteropError(f"4bit leaves {sorted(lazy)}: expected packed, absmax[, nested_absmax, offset]")
    shape = _field(
        spec,
        "shape",
        lambda x: isinstance(x, list) and 0 < len(x) <= 64 and all(_is_int(d) and d > 0 for d in x),
        "a list of positive integers",
    )
    return FourBitWeight(
        packed=lazy["packed"],
        absmax=lazy["absmax"],
        nested_absmax=lazy.get("nested_absmax"),
        offset=_scalar_offset(lazy.get("offset")),
        shape=tuple(shape),
        dtype=dtype,
        blocksize=_field(spec, "blocksize", _is_int, "an integer"),
        quant_type=_field(spec, "quant_type", lambda x: isinstance(x, str), "'nf4' or 'fp4'"),
    )


def _tensor_names(spec: Mapping[str, Any]) -> dict[str, str]:
    """The spec's leaf name -> tensor name (``tensors``; ``{"": tensor}`` for an array)."""
    if spec["kind"] == "array":
        names = {"": spec.get("tensor")}
    else:
        names = spec.get("tensors")
        if not isinstance(names, dict):
            raise InteropError(f"'tensors' {names!r:.80}: expected an object of leaf name -> tensor name")
    bad = [v for v in names.values() if not isinstance(v, str)]
    if bad:
        raise InteropError(f"tensor name(s) {bad[:3]!r}: expected strings")
    return names


def _leaf(spec: Any, f: SafetensorsFile, module: str) -> tuple[Any, list[str]]:
    """The leaf a spec describes (lazy) and the tensor names it uses."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) or spec["kind"] not in _SPEC_KEYS:
        raise InteropError(f"expected a spec with kind 'array', 'int8' or '4bit', got {spec!r:.80}")
    kind = spec["kind"]
    unknown = sorted(set(spec) - _SPEC_KEYS[kind])
    if unknown:
        raise InteropError(f"unknown key(s) {unknown} for kind {kind!r}")
    names = _tensor_names(spec)
    if kind == "array":
        return f.lazy(names[""]), list(names.values())
    lazy = {k: f.lazy(v) for k, v in names.items()}
    q = _quantized(kind, spec, lazy)
    # Validate exactly as a bnb checkpoint layer is validated (shapes vs. quant state, dtypes, ...).
    return bnb.from_state_dict(bnb.to_entries(q, module), module, dtype=q.dtype), list(names.values())


def read_jax_checkpoint(
    path: str | os.PathLike, *, lazy: bool = False, allow_symlinks: bool = False
) -> tuple[dict[str, Any], Weights]:
    """Read a JAX checkpoint directory into ``(config, weights)`` (the structure of ``read_checkpoint``).

    Its files are untrusted as ``read_checkpoint``'s are (``allow_symlinks``: follow links that stay inside
    the directory).

    Raises:
      InteropError: a missing or corrupt file, another format or version, an unknown key or a value of the
        wrong type, a tensor that is not described (or described but absent), or a quantized layer
        ``interop.bnb`` refuses.

    Example:
      >>> import tempfile
      >>> from interop._hf_config import bnb_quantization_config
      >>> from oftjax import quant
      >>> config = {"quantization_config": bnb_quantization_config("int8")}
      >>> weights = {"lin": {"weight": quant.quantize_int8(np.ones((2, 3), np.float32))}}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     _ = write_jax_checkpoint(Path(tmp) / "jax", config, weights)
      ...     _, back = read_jax_checkpoint(Path(tmp) / "jax")
      >>> back["lin"]["weight"].CB.tolist()
      [[127, 127, 127], [127, 127, 127]]
    """
    root = Root(path, allow_symlinks=allow_symlinks)
    meta_path = root.path / META
    meta = read_json(root.file(META))
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown:
        raise InteropError(f"{meta_path}: unknown key(s) {unknown} (known: {sorted(_META_KEYS)})")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise InteropError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}: expected "
            f"{FORMAT!r} version {FORMAT_VERSION}"
        )
    config, modules = meta.get("config"), meta.get("modules")
    if not isinstance(config, dict) or not isinstance(modules, dict):
        raise InteropError(f"{meta_path}: 'config' and 'modules' must be objects")
    f = SafetensorsFile(root.file(DATA))
    weights: Weights = {}
    used: set[str] = set()
    for module, params in modules.items():
        if not isinstance(params, dict):
            raise InteropError(f"{meta_path}: modules[{module!r}] must be an object")
        for name, spec in params.items():
            where = f"{meta_path}: {module}.{name}" if module else f"{meta_path}: {name}"
            try:
                leaf, tnames = _leaf(spec, f, module)
            except InteropError as e:
                msg = str(e)
                raise InteropError(msg if msg.startswith(str(root.path)) else f"{where}: {msg}") from e
            weights.setdefault(module, {})[name] = leaf
            used.update(tnames)
    extra = sorted(set(f.keys()) - used)
    if extra:
        raise InteropError(f"{root.path / DATA}: tensor(s) {extra[:5]} not described in {META}")
    if not weights:
        raise InteropError(f"{meta_path}: 'modules' describes no tensors")
    check_model_config(config, where=f"{meta_path}: config")
    qc = config.get("quantization_config")
    if qc is not None:
        validate_quantization_config(qc, where=str(meta_path))
    check_weights_match_config(config, weights, where=str(meta_path))
    check_known_architecture(config, weights, source=str(root.path), where=f"{meta_path}: config")
    return config, (weights if lazy else materialize(weights))


def checkpoint_to_jax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool = False,
    allow_symlinks: bool = False,
) -> Path:
    """Convert an HF checkpoint directory (float / bnb 8-bit / bnb 4-bit) to a JAX one, tensor by tensor.

    Quantized tensors are copied byte for byte; other files of ``src`` (tokenizer...) are copied too.
    Validation of every layer happens before anything is written; the output directory appears only when
    complete.

    Example:
      >>> import tempfile
      >>> weights = {"lm_head": {"weight": np.ones((2, 3), np.float32)}}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     _ = write_checkpoint(Path(tmp) / "hf", {"architectures": ["Tiny"]}, weights)
      ...     _ = (Path(tmp) / "hf" / "tokenizer.json").write_text("{}")
      ...     jax_dir = checkpoint_to_jax(Path(tmp) / "hf", Path(tmp) / "jax")
      ...     sorted(p.name for p in jax_dir.iterdir())
      ['oftjax_checkpoint.json', 'tokenizer.json', 'weights.safetensors']
    """
    src = Path(src)
    config, weights = read_checkpoint(src, lazy=True, allow_symlinks=allow_symlinks)
    extra = extra_files_of(src, skip=(CONFIG, META), allow_symlinks=allow_symlinks)
    return write_jax_checkpoint(dst, config, weights, force=force, progress=progress, extra_files=extra)


def checkpoint_to_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    allow_symlinks: bool = False,
) -> Path:
    """Convert a JAX checkpoint directory back to an HF directory that transformers loads.

    Other files of ``src`` (tokenizer...) are copied; shards are cut at ``max_shard_size`` (``"5GB"``).

    Example:
      >>> import tempfile
      >>> weights = {"lm_head": {"weight": np.ones((2, 3), np.float32)}}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     jax_dir = write_jax_checkpoint(Path(tmp) / "jax", {"architectures": ["Tiny"]}, weights)
      ...     hf_dir = checkpoint_to_hf(jax_dir, Path(tmp) / "hf")
      ...     sorted(p.name for p in hf_dir.iterdir())
      ['config.json', 'model.safetensors']
    """
    src = Path(src)
    parse_size(max_shard_size)  # checked before anything is read or written
    config, weights = read_jax_checkpoint(src, lazy=True, allow_symlinks=allow_symlinks)
    extra = extra_files_of(src, skip=(CONFIG, META), allow_symlinks=allow_symlinks)
    return write_checkpoint(
        dst, config, weights, force=force, progress=progress, max_shard_size=max_shard_size, extra_files=extra
    )
