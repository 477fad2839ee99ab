"""HF checkpoint directories (float, bnb 8-bit, bnb 4-bit) <-> per-module weight dicts (numpy only, no torch).

The structure both directions use (``Weights``): ``{module_path: {param_name: leaf}}`` where ``module_path``
is the tensor name up to its last dot (``"model.layers.0.self_attn.q_proj"``, ``""`` for a top-level tensor)
and a leaf is
  * ``oftjax.quant.Int8Weight`` / ``FourBitWeight`` under ``"weight"`` for a bnb-quantized linear layer (its
    bnb tensors ``weight``, ``SCB``, ``weight.absmax``... are consumed; never converted through float), or
  * a numpy array (any dtype; bf16 as ``ml_dtypes.bfloat16``) for every other tensor (``bias``, norms,
    embeddings, ``lm_head``...), under its own name.
With ``lazy=True`` the array leaves are ``LazyTensor``s (shape and dtype known, bytes read on ``load()``), so
a converter streams a checkpoint tensor by tensor.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from interop import bnb
from interop._hf_config import bnb_quantization_config as bnb_quantization_config  # for interop.hf_model
from interop._hf_config import check_model_config, check_weights_match_config, validate_quantization_config
from interop._hf_shapes import check_known_architecture
from interop._io import InteropError, atomic_write_bytes, output_dir, read_json
from interop._paths import Root, open_regular
from interop._safetensors import LazyTensor, SafetensorsFile, total_nbytes, write_safetensors
from oftjax.quant import FourBitWeight, Int8Weight

Leaf = Any  # np.ndarray | LazyTensor | Int8Weight | FourBitWeight
Weights = dict[str, dict[str, Leaf]]

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS, TORCH_BIN_INDEX, TORCH_BIN)
DEFAULT_MAX_SHARD_SIZE = "5GB"

# --------------------------------------------------------------------------------------------- reading


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``layers.2`` before ``layers.10``.

    Example:
      >>> sorted(["layers.10.mlp", "layers.2.mlp"], key=natural_key)
      ['layers.2.mlp', 'layers.10.mlp']
    """
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # lazily: only this branch needs torch
    except ImportError as e:
        raise InteropError(
            f"{path}: reading a torch state-dict file (.bin/.pt) needs torch, which is not installed; "
            "install torch or convert the file to safetensors"
        ) from e
    import ml_dtypes

    os.close(open_regular(path))  # a regular file (torch.load would block on a FIFO)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many error types for corrupt/truncated pickles
        raise InteropError(f"{path}: cannot load torch state dict ({e})") from e
    if not isinstance(sd, Mapping):
        raise InteropError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    out = {}
    for k, t in sd.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise InteropError(f"{path}: entry {k!r} is a {type(t).__name__}, not a tensor named by a string")
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        else:
            out[k] = t.numpy().copy()
    return out


# The weight files an index may list: safetensors shards for a safetensors index, torch files for a torch one.
_SHARD_SUFFIXES = {SAFETENSORS_INDEX: (".safetensors",), TORCH_BIN_INDEX: (".bin", ".pt", ".pth")}


def _weight_files(root: Root, single: str | None) -> tuple[list[Path], dict[str, Path], Path | None]:
    """The weight files of a checkpoint (each checked inside ``root``), the index's tensor name -> file, and
    the index file (None without one)."""
    if single is not None:
        return [root.file(single)], {}, None
    name = next((n for n in WEIGHT_FILES if root.exists(n)), None)
    if name is None:
        raise InteropError(f"{root.path}: no weights found (looked for {', '.join(WEIGHT_FILES)})")
    if not name.endswith(".index.json"):
        return [root.file(name)], {}, None
    index_path = root.file(name)
    wmap = read_json(index_path).get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise InteropError(f"{index_path}: 'weight_map': expected a non-empty object of tensor name -> file")
    listed: dict[str, Path] = {}
    files: dict[str, Path] = {}
    for key, shard in wmap.items():
        where = f"{index_path}: weight_map[{key!r}]"
        if not isinstance(shard, str) or not shard.endswith(_SHARD_SUFFIXES[name]):
            raise InteropError(f"{where}: {shard!r}: expected a file name ending in {_SHARD_SUFFIXES[name]}")
        if shard not in files:
            files[shard] = root.file(shard, where=where)
        listed[key] = files[shard]
    return [files[f] for f in sorted(files)], listed, index_path


def _sources(root: Root, single: str | None) -> tuple[dict[str, Any], dict[str, Path]]:
    """tensor name -> lazy tensor (or array for torch files), and tensor name -> file it came from."""
    files, listed, index_path = _weight_files(root, single)
    tensors: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for f in files:
        if f.suffix == ".safetensors":
            handle = SafetensorsFile(f)
            items = ((k, handle.lazy(k)) for k in handle.keys())
        else:
            items = iter(_torch_state_dict(f).items())
        for k, v in items:
            if k in tensors:
                raise InteropError(f"{f}: tensor {k!r} also appears in {origin[k]}")
            tensors[k], origin[k] = v, f
    for k, f in listed.items():
        if origin.get(k) != f:
            raise InteropError(f"{f}: missing tensor key {k!r} (listed in {index_path})")
    if not tensors:
        raise InteropError(f"{root.path}: no tensors in {', '.join(str(f) for f in files)}")
    return tensors, origin


_LAYER_SUFFIXES = (
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
)


def _check_no_bare_codes(
    tensors: dict[str, Any], origin: dict[str, Path], consumed: set[str], qc: Any
) -> None:
    """With a bnb ``quantization_config``, an integer ``weight`` outside every bnb layer is a layer whose
    SCB / quant_state tensors are missing: refuse it rather than load the codes as float weights."""
    if qc is None:
        return
    for k in tensors:
        if k in consumed or not (k == "weight" or k.endswith(".weight")):
            continue
        if np.issubdtype(np.dtype(tensors[k].dtype), np.integer):
            raise InteropError(
                f"{origin[k]}: tensor {k!r} holds {np.dtype(tensors[k].dtype)} codes but its layer has no "
                f"SCB (8-bit) or {bnb.QUANT_STATE}<nf4|fp4> (4-bit) tensor, although config.json has a "
                "quantization_config; the checkpoint is incomplete"
            )


def _group(tensors: dict[str, Any], origin: dict[str, Path], int8_dtype: Any, qc: Any = None) -> Weights:
    qs_marker = "." + bnb.QUANT_STATE
    four = {k.split(qs_marker)[0] for k in tensors if qs_marker in k}
    eight = {k[: -len(".SCB")] for k in tensors if k.endswith(".SCB")}
    consumed: set[str] = set()
    weights: Weights = {}
    for module in sorted(four | eight, key=natural_key):
        p = module + "."
        sub = {p + s: tensors[p + s] for s in (*_LAYER_SUFFIXES, "SCB", "weight_format") if p + s in tensors}
        sub.update({k: tensors[k] for k in tensors if k.startswith(p + bnb.QUANT_STATE)})
        where = origin.get(p + "weight") or origin[next(iter(sub))]
        try:
            q = bnb.from_state_dict(sub, module, dtype=int8_dtype)
        except InteropError as e:
            raise InteropError(f"{where}: {e}") from e
        consumed.update(sub)
        weights.setdefault(module, {})["weight"] = q
    for k in tensors:
        if k in consumed:
            continue
        for s in (*_LAYER_SUFFIXES[1:], "weight_format"):
            if k.endswith("." + s):
                raise InteropError(
                    f"{origin[k]}: missing tensor key: {k!r} is present but its layer has no "
                    f"{bnb.QUANT_STATE}<nf4|fp4> / SCB tensor"
                )
    _check_no_bare_codes(tensors, origin, consumed, qc)
    for k in sorted((k for k in tensors if k not in consumed), key=natural_key):
        module, _, name = k.rpartition(".")
        weights.setdefault(module, {})[name] = tensors[k]
    return {m: weights[m] for m in sorted(weights, key=natural_key)}


def materialize(weights: Weights) -> Weights:
    """Replace every ``LazyTensor`` leaf by its numpy array (reads the files)."""

    def load(x: Any) -> Any:
        return x.load() if isinstance(x, LazyTensor) else x

    out: Weights = {}
    for module, params in weights.items():
        out[module] = {}
        for name, leaf in params.items():
            if isinstance(leaf, (Int8Weight, FourBitWeight)):
                leaf = type(leaf)(**{f: load(getattr(leaf, f)) for f in leaf.__dataclass_fields__})
            out[module][name] = load(leaf)
    return out


def _root(path: Path, allow_symlinks: bool) -> tuple[Root, str | None]:
    """The root directory to read and, when ``path`` names one weights file, that file's name in it."""
    if path.is_dir():
        return Root(path, allow_symlinks=allow_symlinks), None
    if not os.path.lexists(path):
        raise InteropError(f"{path}: checkpoint directory or weights file not found")
    real = Path(os.path.realpath(path))  # a file named on purpose by the caller: its directory is the root
    return Root(real.parent, allow_symlinks=allow_symlinks), real.name


def read_checkpoint(
    path: str | os.PathLike, *, lazy: bool = False, allow_symlinks: bool = False
) -> tuple[dict[str, Any], Weights]:
    """Read an HF checkpoint directory (float, bnb 8-bit or bnb 4-bit) without passing quantized layers
    through float.

    Every file is untrusted (``interop._paths``): index entries must name files inside the directory, links
    are followed only with ``allow_symlinks`` and only inside it (a Hugging Face cache snapshot's links into
    its blobs always are), only regular files are opened, every header and config value is checked.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors``, a sharded
        ``model.safetensors.index.json``, or torch ``pytorch_model.bin`` (``.index.json``; needs torch); or a
        single ``.safetensors`` / ``.bin`` / ``.pt`` file (config.json then read from beside it when present).
      lazy: leave array leaves as ``LazyTensor`` (memory-mapped; read on ``load()``) for streaming conversion.
      allow_symlinks: follow symbolic links that stay inside the directory.

    Returns:
      ``(config, weights)``: config.json as a dict (its ``quantization_config`` validated) and
      ``{module_path: {param_name: leaf}}`` (see the module docstring); quantized layers as
      ``Int8Weight`` / ``FourBitWeight`` under ``"weight"``; int8 layers take their ``dtype`` from
      config ``dtype`` (or ``torch_dtype``).

    Raises:
      InteropError: missing/truncated/corrupt files, missing keys, shapes disagreeing with a layer's quant
        state, unknown quant types, unknown quantization_config keys, paths leaving the directory... naming
        the file and key.

    Example:
      >>> import tempfile
      >>> from oftjax import quant
      >>> config = {"quantization_config": bnb_quantization_config("4bit", quant_type="nf4")}
      >>> q = quant.quantize_4bit(np.ones((4, 64), np.float32), quant_type="nf4")
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     _ = write_checkpoint(Path(tmp) / "hf", config, {"model.layers.0.mlp.up_proj": {"weight": q}})
      ...     config, weights = read_checkpoint(Path(tmp) / "hf")
      >>> weights["model.layers.0.mlp.up_proj"]["weight"].quant_type
      'nf4'
    """
    root, single = _root(Path(path), allow_symlinks)
    cfg_path = root.path / CONFIG
    config: dict[str, Any] = read_json(root.file(CONFIG)) if single is None or root.exists(CONFIG) else {}
    check_model_config(config, where=str(cfg_path))
    qc = config.get("quantization_config")
    if qc is not None:
        validate_quantization_config(qc, where=str(cfg_path))
    dtype_name = config.get("dtype", config.get("torch_dtype"))
    int8_dtype = bnb.dtype_from_name(dtype_name, where=f"{cfg_path}: dtype: ") if dtype_name else None
    tensors, origin = _sources(root, single)
    weights = _group(tensors, origin, int8_dtype, qc)
    check_weights_match_config(config, weights, where=str(cfg_path))
    check_known_architecture(config, weights, source=str(root.path), where=str(cfg_path))
    return config, (weights if lazy else materialize(weights))


# --------------------------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB`` (10^9), ``2GiB`` (2^30), ``500MB``, ``100KB`` or an int; at least one byte.

    Example:
      >>> parse_size("5GB"), parse_size("2GiB"), parse_size(1000)
      (5000000000, 2147483648, 1000)
    """
    expected = "expected a positive size such as '5GB', '500MB' or a number of bytes"
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,15})?)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size {size!r}: {expected}")
        base = 1024 if m.group(3) else 1000
        n = int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))
    if n < 1:
        raise ValueError(f"max_shard_size {size!r}: {expected}")
    return n


def flatten(weights: Weights) -> dict[str, Any]:
    """Weights -> HF tensor name -> array-like (bnb serialization for quantized leaves; lazy leaves kept)."""
    out: dict[str, Any] = {}
    for module, params in weights.items():
        for name, leaf in params.items():
            path = f"{module}.{name}" if module else name
            if isinstance(leaf, (Int8Weight, FourBitWeight)):
                if name != "weight":
                    raise InteropError(f"{path}: bitsandbytes layers keep their quantized tensor as 'weight'")
                items = bnb.to_entries(leaf, module).items()
            else:
                if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                    raise TypeError(
                        f"{path}: expected an array or a quantized weight, got {type(leaf).__name__}"
                    )
                items = [(path, leaf)]
            for k, v in items:
                if k in out:
                    raise InteropError(f"tensor name {k!r} produced twice (module {module!r})")
                out[k] = v
    return out


def write_torch_state_dict(path: str | os.PathLike, weights: Weights, *, force: bool = False) -> Path:
    """Write ``weights`` as one plain torch state-dict file (``torch.save``; ``.bin`` / ``.pt``). Needs torch.

    The keys, dtypes and bytes are those ``write_checkpoint`` puts in safetensors (bnb serialization for
    quantized layers), i.e. what ``torch.save(model.state_dict())`` of the transformers model holds; it loads
    with ``torch.load(path, weights_only=True)``. Written atomically (temporary file, then rename).

    Example:
      >>> import tempfile
      >>> import torch
      >>> weights = {"lm_head": {"weight": np.ones((2, 3), np.float32)}}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = write_torch_state_dict(Path(tmp) / "pytorch_model.bin", weights)
      ...     torch.load(path, weights_only=True)["lm_head.weight"].shape
      torch.Size([2, 3])
    """
    try:
        import torch  # lazily: only this writer needs torch
    except ImportError as e:
        raise InteropError(
            f"{path}: writing a torch state-dict file needs torch, which is not installed; "
            "write safetensors with write_checkpoint instead"
        ) from e
    import io

    import ml_dtypes

    sd = {}
    for k, v in flatten(materialize(weights)).items():
        a = np.asarray(v)
        if a.dtype == ml_dtypes.bfloat16:
            # torch has no numpy bf16: move the bits through int16 and reinterpret them
            sd[k] = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        else:
            sd[k] = torch.from_numpy(np.array(a, copy=True))
    buf = io.BytesIO()
    torch.save(sd, buf)
    atomic_write_bytes(path, buf.getvalue(), force=force)
    return Path(path)


def _shards(tensors: dict[str, Any], max_bytes: int) -> list[dict[str, Any]]:
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = total_nbytes([v])
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar counting ``total`` bytes (disabled unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, desc=desc)


def write_tensors_sharded(
    dst: Path, tensors: dict[str, Any], *, max_shard_size: int | str, progress: bool, desc: str
) -> None:
    shards = _shards(tensors, parse_size(max_shard_size))
    total = total_nbytes(tensors.values())
    with progress_bar(total, progress, desc) as bar:
        if len(shards) == 1:
            write_safetensors(dst / SAFETENSORS, shards[0], on_bytes=bar.update)
            return
        wmap = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(dst / name, shard, on_bytes=bar.update)
            wmap.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
    (dst / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_config(dst: Path, config: Mapping[str, Any]) -> None:
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as e:
        raise InteropError(f"config is not JSON-serializable ({e})") from e
    (dst / CONFIG).write_text(text + "\n")


def write_checkpoint(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    weights: Weights,
    *,
    force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Write an HF checkpoint directory that transformers ``from_pretrained`` loads.

    Quantized leaves are written in bitsandbytes' serialization (``interop.bnb.to_state_dict``),
    byte-identical to what was read; arrays keep their dtype. Shards (``model-0000i-of-0000N.safetensors`` +
    index) when the tensors exceed ``max_shard_size``. The directory is built in a temporary sibling and
    renamed: on any error nothing is written.

    Args:
      path: the output directory; must not exist unless ``force``.
      config: config.json contents; needs a bnb ``quantization_config`` when weights are quantized (see
        ``bnb_quantization_config``).
      weights: ``{module_path: {param_name: leaf}}`` as ``read_checkpoint`` returns (jax arrays are fine).
      force: replace an existing ``path``.
      max_shard_size: bytes or a string like ``"5GB"``.
      progress: show a tqdm bar (bytes written).
      extra_files: output name -> file to copy verbatim (tokenizer files, generation_config.json...).

    Example:
      >>> import tempfile
      >>> weights = {f"layers.{i}": {"weight": np.zeros((256, 256), np.float32)} for i in range(3)}
      >>> with tempfile.TemporaryDirectory() as tmp:  # three tensors of 262 kB, shards of at most 300 kB
      ...     path = write_checkpoint(Path(tmp) / "hf", {}, weights, max_shard_size="300KB")
      ...     sorted(p.name for p in path.iterdir())  # doctest: +NORMALIZE_WHITESPACE
      ['config.json', 'model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors',
       'model-00003-of-00003.safetensors', 'model.safetensors.index.json']
    """
    path = Path(path)
    max_shard_size = parse_size(max_shard_size)  # checked before anything is written
    check_weights_match_config(config, weights, where=str(path / CONFIG))
    tensors = flatten(weights)
    with output_dir(path, force=force) as tmp:
        write_tensors_sharded(tmp, tensors, max_shard_size=max_shard_size, progress=progress, desc=path.name)
        write_config(tmp, config)
        copy_extra_files(tmp, extra_files or {})
    return path


def copy_extra_files(dst: Path, files: Mapping[str, Path]) -> None:
    """Copy each file (opened as a regular file only: ``interop._paths.open_regular``) to ``dst / name``."""
    import shutil

    for name, src in files.items():
        if Path(name).name != name or name in (CONFIG, *WEIGHT_FILES):
            raise InteropError(
                f"extra file name {name!r} is not a plain file name or clashes with a weights file"
            )
        with os.fdopen(open_regular(src), "rb") as fin, open(dst / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)


def extra_files_of(src: Path, skip: tuple[str, ...], *, allow_symlinks: bool = False) -> dict[str, Path]:
    """Regular files of ``src`` other than weights/config (tokenizer, generation_config.json, README...).

    Subdirectories and hidden files are not copied. A symbolic link is copied (as the file it names) only
    with ``allow_symlinks`` and only when it stays inside ``src``; any other link, and a FIFO, device or
    socket, is an error naming it: converting must neither read outside the directory nor drop a file
    silently.
    """
    if not src.is_dir():
        return {}
    root = Root(src, allow_symlinks=allow_symlinks)
    out = {}
    for name, mode, _ in root.entries():
        if name.startswith(".") or name in skip or stat.S_ISDIR(mode):
            continue
        if Path(name).suffix in (".safetensors", ".bin", ".pt", ".pth") or name.endswith(".index.json"):
            continue
        out[name] = root.file(name, where=f"{src}: extra file {name!r}")
    return out
