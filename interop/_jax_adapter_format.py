"""The JAX adapter format: one directory, several adapters, keyed by NNX state paths (numpy only).

``oftjax_adapter.json``: ``{"format": "oftjax-adapter", "format_version": 1, "adapters": {name: {"config":
<every OFTConfig field, legacy_neumann included>, "keys": [...], "peft_extras": {"auto_mapping": ...}}}}``;
``oftjax_adapter.safetensors``: the tensors under the NNX state paths of ``oftjax.nn.OFTLinear``/``OFTEmbed``:
``<module>.oft_R.<adapter>`` (``oftjax.nn.OFTParam`` ``[R, b(b-1)/2]``),
``<module>.oft_embedding_R.<adapter>``, ``<module>.bias`` (base biases saved with ``bias != "none"``; at
most one adapter may carry them, as in PEFT) and ``<module>.embedding`` (the base table PEFT saves next to a
targeted input embedding, its ``<module>.base_layer.weight``).

``adapter_to_jax`` / ``adapter_to_peft`` convert whole PEFT save directories (the root adapter and the
subfolder adapters) to and from this format, file to file: the tensors are renamed, never recomputed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oftjax.config import OFTConfig

from . import _peft_format as fmt
from ._io import InteropError, atomic_write_json, check_destination, output_dir, read_json
from ._paths import Root
from ._peft_files import list_adapters, read_adapter_with_extras, write_adapter
from ._safetensors import atomic_save_safetensors, read_safetensors

CONFIG_FILE = "oftjax_adapter.json"
WEIGHTS_FILE = "oftjax_adapter.safetensors"
FORMAT = "oftjax-adapter"
FORMAT_VERSION = 1


def state_key(peft_key: str, adapter_name: str, config: OFTConfig) -> str:
    """The NNX state path of a PEFT key (``base_model.model.lin0.oft_R.weight`` -> ``lin0.oft_R.default``).

    Example:
        >>> state_key("base_model.model.lin0.oft_R.weight", "default", OFTConfig(target_modules=["lin0"]))
        'lin0.oft_R.default'
    """
    parsed = fmt.parse_key(peft_key, config, Path("<keys>"))
    if parsed.kind in fmt.ROTATION_KINDS:
        return f"{parsed.module}.{parsed.kind}.{adapter_name}"
    if parsed.kind in ("base_bias", "bias"):
        return f"{parsed.module}.bias"
    if parsed.kind == "embedding_base":  # the base table, under nnx.Embed's state name
        return f"{parsed.module}.embedding"
    return f"{parsed.module}.{parsed.attr}"


def peft_key(key: str, adapter_name: str, rotated: set[str]) -> str:
    """The PEFT key of an NNX state path (inverse of ``state_key``; ``rotated``: modules with a rotation).

    Example:
        >>> peft_key("lin0.bias", "default", {"lin0"})
        'base_model.model.lin0.base_layer.bias'
    """
    for kind in fmt.ROTATION_KINDS:
        suffix = f".{kind}.{adapter_name}"
        if key.endswith(suffix):
            return f"{fmt.PEFT_PREFIX}{key[: -len(suffix)]}.{kind}.weight"
    module, _, attr = key.rpartition(".")
    if attr == "bias" and module in rotated:
        return f"{fmt.PEFT_PREFIX}{module}.base_layer.bias"
    if attr == "embedding" and module in rotated:
        return f"{fmt.PEFT_PREFIX}{module}.base_layer.weight"
    return f"{fmt.PEFT_PREFIX}{key}"


def state_tensors(
    tensors: Mapping[str, np.ndarray], adapter_name: str, config: OFTConfig
) -> dict[str, np.ndarray]:
    """PEFT-named tensors of one adapter keyed by their NNX state paths (``state_key`` of each key).

    Example:
        >>> t = {"base_model.model.lin0.oft_R.weight": np.zeros((1, 6))}
        >>> list(state_tensors(t, "two", OFTConfig(target_modules=["lin0"])))
        ['lin0.oft_R.two']
    """
    return {state_key(k, adapter_name, config): v for k, v in tensors.items()}


def peft_tensors(arrays: Mapping[str, np.ndarray], adapter_name: str) -> dict[str, np.ndarray]:
    """One adapter's tensors keyed by NNX state paths, renamed to PEFT keys (inverse of ``state_tensors``).

    Example:
        >>> arrays = {"lin0.oft_R.two": np.zeros((1, 6)), "lin0.bias": np.zeros(4)}
        >>> sorted(peft_tensors(arrays, "two"))
        ['base_model.model.lin0.base_layer.bias', 'base_model.model.lin0.oft_R.weight']
    """
    rotated = {
        k[: -len(f".{kind}.{adapter_name}")]
        for k in arrays
        for kind in fmt.ROTATION_KINDS
        if k.endswith(f".{kind}.{adapter_name}")
    }
    return {peft_key(k, adapter_name, rotated): v for k, v in arrays.items()}


def _config_dict(config: OFTConfig) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _config_from_dict(d: Any, source: Path, name: str) -> OFTConfig:
    if not isinstance(d, dict):
        raise InteropError(f"{source}: adapter {name!r}: 'config' must be an object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(OFTConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InteropError(f"{source}: adapter {name!r}: unknown config key(s) {unknown}")
    try:
        return OFTConfig(**d)
    except (TypeError, ValueError) as e:
        raise InteropError(f"{source}: adapter {name!r}: invalid OFT config ({e})") from e


def _entry(name: Any, entry: Any, source: Path) -> tuple[list[str], dict[str, Any]]:
    """An adapter entry's ``keys`` and ``peft_extras``, type-checked (``_config_from_dict`` checks its
    config)."""
    try:
        fmt.check_adapter_name(name)
    except InteropError as e:
        raise InteropError(f"{source}: 'adapters': {e}") from None
    if not isinstance(entry, dict):
        raise InteropError(f"{source}: adapter {name!r}: expected an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - {"config", "keys", "peft_extras"})
    if unknown:
        raise InteropError(f"{source}: adapter {name!r}: unknown key(s) {unknown}")
    keys = entry.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise InteropError(f"{source}: adapter {name!r}: 'keys' {keys!r:.80}: expected a list of names")
    extras = entry.get("peft_extras", {})
    ignorable = set(fmt.IGNORED_CONFIG_KEYS) - {"peft_type"}
    if not isinstance(extras, dict) or not set(extras) <= ignorable:
        raise InteropError(
            f"{source}: adapter {name!r}: 'peft_extras' {extras!r:.80}: expected an object with keys among "
            f"{sorted(ignorable)}"
        )
    return keys, extras


def write_jax_adapter(
    path: str | os.PathLike,
    adapters: Mapping[str, tuple[OFTConfig, Mapping[str, np.ndarray]]],
    *,
    extras: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
) -> Path:
    """Write a JAX adapter directory: ``{name: (config, {NNX state path: array})}``, built aside and renamed.

    Args:
        path: the output directory; must not exist unless ``force``.
        adapters: adapter name -> its config and tensors under NNX state paths (``state_tensors``).
        extras: adapter name -> ignored PEFT config keys to keep for the way back (``auto_mapping``).
        force: replace an existing ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is False (nothing is written).
        InteropError: two adapters write different tensors under one key.

    Example:
        >>> import tempfile
        >>> config = OFTConfig(r=0, oft_block_size=4, target_modules=["lin0"])
        >>> vec = np.zeros((1, 6), np.float32)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     adapters = {"default": (config, {"lin0.oft_R.default": vec})}
        ...     path = write_jax_adapter(Path(tmp) / "jax", adapters)
        ...     sorted(p.name for p in path.iterdir())
        ['oftjax_adapter.json', 'oftjax_adapter.safetensors']
    """
    target = Path(path)
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "adapters": {}}
    for name, (config, arrays) in adapters.items():
        keys = sorted(arrays)
        # A base embedding table saved with several adapters is one tensor (listed by each adapter).
        clash = [
            k
            for k in keys
            if k in tensors and not (k.endswith(".embedding") and np.array_equal(tensors[k], arrays[k]))
        ]
        if clash:
            raise InteropError(f"{target / WEIGHTS_FILE}: adapter {name!r}: key(s) {clash[:5]} used twice")
        tensors.update({k: np.asarray(arrays[k]) for k in keys})
        entry = {"config": _config_dict(config), "keys": keys}
        if extras and extras.get(name):
            entry["peft_extras"] = dict(extras[name])
        meta["adapters"][name] = entry
    with output_dir(target, force=force) as tmp:
        atomic_save_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": FORMAT})
        atomic_write_json(tmp / CONFIG_FILE, meta)
    return target


def read_jax_adapter(
    path: str | os.PathLike, *, allow_symlinks: bool = False
) -> tuple[dict[str, tuple[OFTConfig, dict[str, np.ndarray]]], dict[str, dict[str, Any]]]:
    """Read a JAX adapter directory -> ``({name: (config, {state path: array})}, {name: extras})``.

    Its files are untrusted (``interop._paths``; ``allow_symlinks``: follow links that stay inside it) and
    every value of ``oftjax_adapter.json`` is type-checked.

    Raises:
        InteropError: missing or corrupt files, a wrong format or version, a value of the wrong type, keys
            listed but absent.

    Example:
        >>> import tempfile
        >>> config = OFTConfig(r=0, oft_block_size=4, target_modules=["lin0"])
        >>> vec = np.zeros((1, 6), np.float32)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = write_jax_adapter(Path(tmp) / "jax", {"two": (config, {"lin0.oft_R.two": vec})})
        ...     adapters, extras = read_jax_adapter(path)
        >>> sorted(adapters), list(adapters["two"][1]), extras
        (['two'], ['lin0.oft_R.two'], {'two': {}})
    """
    root = Root(path, allow_symlinks=allow_symlinks)
    source = root.path / CONFIG_FILE
    meta = read_json(root.file(CONFIG_FILE))
    if meta.get("format") != FORMAT:
        raise InteropError(f"{source}: 'format' is {meta.get('format')!r}; expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InteropError(
            f"{source}: 'format_version' is {meta.get('format_version')!r}; this oftjax reads "
            f"{FORMAT_VERSION}"
        )
    entries = meta.get("adapters")
    if not isinstance(entries, dict) or not entries:
        raise InteropError(f"{source}: 'adapters' must be a non-empty object of adapter name -> entry")
    checked = {name: _entry(name, entry, source) for name, entry in entries.items()}
    configs = {name: _config_from_dict(e.get("config", {}), source, name) for name, e in entries.items()}
    weights_path = root.file(WEIGHTS_FILE)
    tensors = read_safetensors(weights_path)
    listed = {k for keys, _ in checked.values() for k in keys}
    extra_keys = sorted(set(tensors) - listed)
    if extra_keys:
        raise InteropError(f"{weights_path}: tensor key(s) {extra_keys[:5]} not listed in {source}")
    adapters, extras = {}, {}
    for name, (keys, peft_extras) in checked.items():
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise InteropError(f"{weights_path}: adapter {name!r}: missing tensor key(s) {missing[:5]}")
        adapters[name] = (configs[name], {k: tensors[k] for k in keys})
        extras[name] = dict(peft_extras)
    return adapters, extras


def adapter_to_jax(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    force: bool = False,
    *,
    allow_symlinks: bool = False,
) -> Path:
    """Convert a PEFT adapter directory (root adapter and any subfolder adapters) to a JAX adapter directory.

    Every adapter is read and validated (``read_adapter``) before anything is written.

    Raises:
        FileExistsError: ``dst_dir`` exists and ``force`` is False.
        InteropError: no adapter in ``src_dir``, or one that ``read_adapter`` refuses.

    Example:
        >>> import tempfile
        >>> config = OFTConfig(r=0, oft_block_size=4, target_modules=["lin0"])
        >>> tensors = {"base_model.model.lin0.oft_R.weight": np.zeros((1, 6), np.float32)}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = write_adapter(Path(tmp) / "peft", config, tensors)
        ...     _ = write_adapter(Path(tmp) / "peft", config, tensors, adapter_name="other")
        ...     adapters, _ = read_jax_adapter(adapter_to_jax(Path(tmp) / "peft", Path(tmp) / "jax"))
        >>> {name: list(arrays) for name, (_, arrays) in adapters.items()}
        {'default': ['lin0.oft_R.default'], 'other': ['lin0.oft_R.other']}
    """
    src, dst = Path(src_dir), Path(dst_dir)
    check_destination(dst, force, directory=True)
    names = list_adapters(src, allow_symlinks=allow_symlinks)
    if not names:
        read_adapter_with_extras(src, allow_symlinks=allow_symlinks)  # raises the precise "not found" error
    adapters, extras = {}, {}
    for name in names:
        config, tensors, extras[name] = read_adapter_with_extras(src, name, allow_symlinks=allow_symlinks)
        adapters[name] = (config, state_tensors(tensors, name, config))
    return write_jax_adapter(dst, adapters, extras=extras, force=force)


def adapter_to_peft(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    force: bool = False,
    *,
    allow_symlinks: bool = False,
) -> Path:
    """Convert a JAX adapter directory to a PEFT adapter directory (non-default adapters in subfolders).

    Every adapter is checked against PEFT's format before anything is written; the directory is built aside
    and renamed.

    Raises:
        FileExistsError: ``dst_dir`` exists and ``force`` is False.
        InteropError: a bad JAX adapter directory, or tensors PEFT's format cannot hold.

    Example:
        >>> import tempfile
        >>> config = OFTConfig(r=0, oft_block_size=4, target_modules=["lin0"])
        >>> vec = np.zeros((1, 6), np.float32)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = write_jax_adapter(Path(tmp) / "jax", {"default": (config, {"lin0.oft_R.default": vec})})
        ...     peft_dir = adapter_to_peft(Path(tmp) / "jax", Path(tmp) / "peft")
        ...     sorted(p.name for p in peft_dir.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    src, dst = Path(src_dir), Path(dst_dir)
    check_destination(dst, force, directory=True)
    adapters, extras = read_jax_adapter(src, allow_symlinks=allow_symlinks)
    converted = {}
    for name, (config, arrays) in adapters.items():
        tensors = peft_tensors(arrays, name)
        fmt.check_tensors(tensors, config, src / WEIGHTS_FILE)
        converted[name] = (config, tensors)
    with output_dir(dst, force=force) as tmp:
        for name, (config, tensors) in converted.items():
            write_adapter(tmp, config, tensors, adapter_name=name, force=True, extras=extras.get(name))
    return dst
