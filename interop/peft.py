"""PEFT OFT adapter directories <-> oftjax (numpy + safetensors + json; torch is never imported here).

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.oft_R.weight`` of shape ``[r or 1, b(b-1)/2]`` (``oft_embedding_R.weight``
for embeddings, with the base table ``<module>.base_layer.weight`` when PEFT saves embedding layers;
``<module>.base_layer.bias`` with ``bias="oft_only"``). A non-default adapter is saved by PEFT
in a subfolder named after it. File format versions (``_peft_format``): PEFT >= 0.18 is read as is;
0.16-0.17 Cayley-Neumann adapters are evaluated with the series they were trained with
(``OFTConfig.legacy_neumann``), with a warning; 0.14-0.15 adapters (``oft_r`` + ``oft_s``) are converted
exactly when ``oft_s == 1`` and refused otherwise; <= 0.13 adapters are refused. Unlike PEFT 0.21, which
silently drops 0.15 weights, nothing is ever dropped without an error.

Config keys: every ``OFTConfig`` field is handled under PEFT's name (r, oft_block_size, module_dropout,
target_modules, exclude_modules, layers_to_transform, layers_pattern, bias, init_weights, coft, eps,
block_share, use_cayley_neumann, num_cayley_neumann_terms, fan_in_fan_out, modules_to_save, task_type,
base_model_name_or_path, revision, inference_mode, peft_version); ``peft_type`` must be "OFT";
``auto_mapping`` (torch class names) is knowingly ignored and written back verbatim on round trips
(``_peft_format.IGNORED_CONFIG_KEYS``). Any other key is an error naming it (PEFT would warn and drop it).

The JAX adapter checkpoint (``adapter_to_jax`` / ``adapter_to_peft``) is a directory with
``oftjax_adapter.json`` (format version, one OFTConfig dict per adapter name) and
``oftjax_adapter.safetensors`` keyed by NNX state paths: ``<module>.oft_R.<adapter>``,
``<module>.oft_embedding_R.<adapter>`` and ``<module>.bias`` (base biases saved with ``bias != "none"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oftjax import __version__ as _OFTJAX_VERSION
from oftjax.config import OFTConfig

from . import _peft_format as fmt
from ._io import (
    InteropError,
    atomic_save_safetensors,
    atomic_write_json,
    output_dir,
    read_json,
    read_safetensors,
)
from ._jax_adapter_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    peft_tensors,
    read_jax_adapter,
    state_key,
    write_jax_adapter,
)

__all__ = [
    "InteropError",
    "adapter_to_jax",
    "attach_adapter",
    "collect_adapter",
    "list_adapters",
    "load_adapter",
    "load_jax_adapter",
    "adapter_to_peft",
    "read_adapter",
    "read_jax_adapter",
    "save_adapter",
    "save_jax_adapter",
    "write_adapter",
    "write_jax_adapter",
]

ADAPTER_CONFIG = fmt.ADAPTER_CONFIG
ADAPTER_WEIGHTS = fmt.ADAPTER_WEIGHTS


# ----------------------------------------------------------------------------------------------------
# PEFT directories


def _adapter_dir(path: str | os.PathLike, adapter_name: str | None) -> Path:
    root = Path(path)
    if adapter_name not in (None, "default"):
        sub = root / adapter_name
        if (sub / ADAPTER_CONFIG).is_file():
            return sub
    if (root / ADAPTER_CONFIG).is_file():
        return root
    if not root.is_dir():
        raise InteropError(f"{root}: adapter directory not found")
    subs = list_adapters(root)
    where = f" (adapter_name={adapter_name!r})" if adapter_name else ""
    hint = f"; adapters found in subfolders: {subs}" if subs else ""
    raise InteropError(f"{root / ADAPTER_CONFIG}: file not found{where}{hint}")


def list_adapters(path: str | os.PathLike) -> list[str]:
    """Adapter names in a PEFT save directory: "default" for the root, then subfolders (as PEFT saves them).

    Example:
        >>> list_adapters("my_adapter")  # doctest: +SKIP
        ['default', 'other']
    """
    root = Path(path)
    names = ["default"] if (root / ADAPTER_CONFIG).is_file() else []
    if root.is_dir():
        names += sorted(p.name for p in root.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file())
    return names


def _read(path: str | os.PathLike, adapter_name: str | None) -> tuple[OFTConfig, dict[str, np.ndarray], dict]:
    adir = _adapter_dir(path, adapter_name)
    config_path, weights_path = adir / ADAPTER_CONFIG, adir / ADAPTER_WEIGHTS
    raw = read_json(config_path)
    if not weights_path.is_file() and (adir / "adapter_model.bin").is_file():
        raise InteropError(
            f"{adir / 'adapter_model.bin'}: torch pickle adapters are not read (no torch on this path); "
            "re-save with save_pretrained(..., safe_serialization=True)"
        )
    fmt.precheck_config(raw, config_path)
    tensors = read_safetensors(weights_path)
    if fmt.is_v015(tensors):
        raw, tensors = fmt.convert_v015(raw, tensors, weights_path)
    config, extras = fmt.config_from_json(raw, config_path)
    fmt.check_tensors(tensors, config, weights_path)
    return config, tensors, extras


def read_adapter(
    path: str | os.PathLike, adapter_name: str | None = None
) -> tuple[OFTConfig, dict[str, np.ndarray]]:
    """Read a PEFT OFT adapter directory into an OFTConfig and its tensors (PEFT key names, numpy arrays).

    Old formats are handled as the module docstring says (0.15 tensors come back as ``oft_R.weight``).

    Args:
        path: the directory ``save_pretrained`` wrote.
        adapter_name: a non-default adapter saved in the subfolder ``path/<adapter_name>``; None or "default"
            reads ``path`` itself.

    Returns:
        ``(config, tensors)``, tensors keyed like ``base_model.model.lin0.oft_R.weight``, dtypes as stored.

    Raises:
        InteropError: missing/corrupt files, unknown config keys, unexpected tensor keys, shapes that disagree
            with the config, or an old format that cannot be converted; the message names the file and key.

    Example:
        >>> config, tensors = read_adapter("my_adapter")  # doctest: +SKIP
        >>> tensors["base_model.model.lin0.oft_R.weight"].shape  # doctest: +SKIP
        (2, 10)
    """
    config, tensors, _ = _read(path, adapter_name)
    return config, tensors


def _check_existing(target: Path, force: bool) -> None:
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if (target / name).exists() and not force:
            raise FileExistsError(f"{target / name}: exists; pass force=True (--force) to overwrite")


def write_adapter(
    path: str | os.PathLike,
    config: OFTConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    adapter_name: str = "default",
    force: bool = False,
    extras: Mapping[str, Any] | None = None,
) -> Path:
    """Write a PEFT OFT adapter directory that ``PeftModel.from_pretrained`` loads.

    Everything is validated before anything is written; files are written atomically. A non-default
    ``adapter_name`` goes to the subfolder ``path/<adapter_name>`` as PEFT's ``save_pretrained`` does.
    ``peft_version`` is written as >= 0.18 (so PEFT uses the current Cayley-Neumann series) unless the config
    is a legacy 0.16-0.17 Neumann adapter, which stays marked as such. Safetensors metadata is
    ``{"format": "pt"}`` plus ``oftjax_version``.

    Args:
        path: the output directory.
        config: the adapter's OFTConfig.
        tensors: PEFT-named tensors (as ``read_adapter`` returns them).
        adapter_name: "default" or the subfolder name.
        force: overwrite existing adapter files.
        extras: ignored config keys to write back verbatim (``auto_mapping``).

    Returns:
        The directory holding the two files.

    Raises:
        FileExistsError: the adapter files exist and ``force`` is False (nothing is written).
        InteropError: tensors that disagree with the config.

    Example:
        >>> config, tensors = read_adapter("in_dir")  # doctest: +SKIP
        >>> write_adapter("out_dir", config, tensors)  # doctest: +SKIP
    """
    root = Path(path)
    target = root if fmt.check_adapter_name(adapter_name) == "default" else root / adapter_name
    fmt.check_tensors(tensors, config, target / ADAPTER_WEIGHTS)
    _check_existing(target, force)
    raw = fmt.config_to_json(config, extras)
    metadata = {"format": "pt", "oftjax_version": _OFTJAX_VERSION}
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    if target.exists():
        atomic_save_safetensors(target / ADAPTER_WEIGHTS, arrays, metadata, force=True)
        atomic_write_json(target / ADAPTER_CONFIG, raw, force=True)
    else:
        with output_dir(target) as tmp:
            atomic_save_safetensors(tmp / ADAPTER_WEIGHTS, arrays, metadata)
            atomic_write_json(tmp / ADAPTER_CONFIG, raw)
    return target


# ----------------------------------------------------------------------------------------------------
# JAX adapter checkpoints


def adapter_to_jax(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, force: bool = False) -> Path:
    """Convert a PEFT adapter directory (root adapter and any subfolder adapters) to a JAX checkpoint.

    Example:
        >>> adapter_to_jax("peft_adapter", "jax_adapter")  # doctest: +SKIP
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst}: exists; pass force=True (--force) to overwrite")
    names = list_adapters(src)
    if not names:
        _adapter_dir(src, None)  # raises the precise "not found" error
    adapters, extras = {}, {}
    for name in names:
        config, tensors, extra = _read(src, name)
        adapters[name] = (config, {state_key(k, name, config): v for k, v in tensors.items()})
        extras[name] = extra
    return write_jax_adapter(dst, adapters, extras=extras, force=force)


def adapter_to_peft(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, force: bool = False) -> Path:
    """Convert a JAX adapter checkpoint back to a PEFT adapter directory (non-default in subfolders).

    Example:
        >>> adapter_to_peft("jax_adapter", "peft_adapter")  # doctest: +SKIP
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst}: exists; pass force=True (--force) to overwrite")
    adapters, extras = read_jax_adapter(src)
    converted = {}
    for name, (config, arrays) in adapters.items():
        tensors = peft_tensors(name, arrays)
        fmt.check_tensors(tensors, config, src / WEIGHTS_FILE)
        converted[name] = (config, tensors)
    with output_dir(dst, force=force) as tmp:
        for name, (config, tensors) in converted.items():
            write_adapter(tmp, config, tensors, adapter_name=name, force=True, extras=extras.get(name))
    return dst


# ----------------------------------------------------------------------------------------------------
# NNX models


def attach_adapter(
    model: Any,
    config: OFTConfig,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str = "default",
    **kwargs: Any,
) -> list[str]:
    """Attach an in-memory adapter (``read_adapter``'s output) to an NNX model; see ``load_adapter``."""
    from ._peft_attach import attach_adapter as _attach

    return _attach(model, config, tensors, adapter_name, **kwargs)


def collect_adapter(
    model: Any, adapter_name: str = "default", config: OFTConfig | None = None, **kwargs: Any
) -> tuple[OFTConfig, dict[str, np.ndarray]]:
    """One adapter of an NNX model as ``(config, PEFT-named tensors)``; see ``save_adapter``."""
    from ._peft_save import collect_adapter as _collect

    return _collect(model, adapter_name, config, **kwargs)


def load_adapter(
    model: Any, path: str | os.PathLike, adapter_name: str = "default", **kwargs: Any
) -> list[str]:
    """Attach a PEFT OFT adapter to an NNX model whose module paths match PEFT's module names.

    See ``interop._peft_attach.load_adapter``.
    """
    from ._peft_attach import load_adapter as _load

    return _load(model, path, adapter_name=adapter_name, **kwargs)


def save_adapter(
    model: Any, path: str | os.PathLike, adapter_name: str = "default", force: bool = False, **kwargs: Any
) -> Path:
    """Save one adapter of an NNX model as a PEFT adapter directory; see ``interop._peft_save``."""
    from ._peft_save import save_adapter as _save

    return _save(model, path, adapter_name=adapter_name, force=force, **kwargs)


def save_jax_adapter(
    model: Any,
    path: str | os.PathLike,
    adapter_names: list[str] | None = None,
    *,
    configs: Mapping[str, OFTConfig] | None = None,
    force: bool = False,
) -> Path:
    """Save adapters of an NNX model (default: all of them) as one JAX adapter checkpoint.

    Example:
        >>> save_jax_adapter(model, "jax_adapter")  # doctest: +SKIP
    """
    from oftjax.nn import OFTAdapters

    from ._peft_attach import module_table

    if adapter_names is None:
        found = [n for _, m in module_table(model).values() if isinstance(m, OFTAdapters) for n in m.adapters]
        adapter_names = list(dict.fromkeys(found))
    adapters = {}
    for name in adapter_names:
        config, tensors = collect_adapter(model, name, (configs or {}).get(name))
        adapters[name] = (config, {state_key(k, name, config): v for k, v in tensors.items()})
    return write_jax_adapter(path, adapters, force=force)


def load_jax_adapter(
    model: Any, path: str | os.PathLike, adapter_names: list[str] | None = None, **kwargs: Any
) -> list[str]:
    """Attach adapters from a JAX adapter checkpoint (default: all) to an NNX model; returns the paths.

    Example:
        >>> load_jax_adapter(model, "jax_adapter")  # doctest: +SKIP
        ['lin0', 'lin1']
    """
    adapters, _ = read_jax_adapter(path)
    names = list(adapters) if adapter_names is None else adapter_names
    missing = [n for n in names if n not in adapters]
    if missing:
        raise InteropError(
            f"{Path(path) / CONFIG_FILE}: no adapter(s) {missing}; it holds {sorted(adapters)}"
        )
    paths: set[str] = set()
    for name in names:
        config, arrays = adapters[name]
        tensors = peft_tensors(name, arrays)
        paths.update(attach_adapter(model, config, tensors, name, source=Path(path) / WEIGHTS_FILE, **kwargs))
    return sorted(paths)
