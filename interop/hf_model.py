"""HF checkpoint directories <-> ``oftjax.models.CausalLM`` (float, bnb 8-bit and 4-bit), every family.

The model side of the checkpoint interop: HF tensor names map one to one onto the NNX module paths
(``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers[0].self_attn.q_proj``; on an OFT-wrapped
layer its ``base_layer``, ``interop._nnx_names.base_module``), torch ``[out, in]`` weights are transposed
into NNX kernels ``[in, out]`` (and back), embeddings and norms keep their layout. Which modules a family has
(Phi-3's fused ``qkv_proj``, Gemma's four norms per layer, q/k norms) comes from
``oftjax.models.linear_modules`` / ``norm_modules``, nothing here is per family.
Quantized projections stay packed: they become ``oftjax.nn.Linear8bit`` / ``Linear4bit`` holding the
``Int8Weight`` / ``FourBitWeight`` read by ``interop.hf.read_checkpoint`` (never a float round trip). The
embedding table is never widened: a bf16 table loaded with ``dtype=float32`` stays bf16 (the model casts the
rows it looks up, and a tied head casts the table once per call), so a 262,144-row vocabulary costs its
checkpoint bytes once.

No torch: numpy, ml_dtypes (bf16) and the safetensors readers of ``interop``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from interop import _hf_checkpoint as hf
from interop._io import InteropError
from interop._nnx_names import base_module
from oftjax.models import CausalLM, ModelConfig, UnsupportedConfigError, linear_modules, norm_modules
from oftjax.nn import module_at, replace_module
from oftjax.quant import FourBitWeight, Int8Weight

# Non-persistent buffers some older checkpoints still carry; they are recomputed from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# --------------------------------------------------------------------------------------------------- layout


def linear_paths(config: ModelConfig) -> list[str]:
    """HF module paths of every projection (the layers apply_oft and the bnb quantizer target) + lm_head.

    Example:
      >>> cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
      ...     num_attention_heads=2, num_key_value_heads=2, head_dim=4, tie_word_embeddings=True)
      >>> linear_paths(cfg)[:2], len(linear_paths(cfg))
      (['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj'], 7)
    """
    return [path for path, _ in linear_modules(config)]


def _get(model: Any, path: str) -> Any:
    """The module holding the tensors HF names ``<path>.weight`` / ``<path>.bias`` (an OFT layer's base)."""
    return base_module(module_at(model, path))


# --------------------------------------------------------------------------------------- tensors -> model


def model_from_modules(
    config: ModelConfig,
    modules: Mapping[str, Mapping[str, Any]],
    *,
    dtype: Any = None,
    compute_dtype: Any = None,
    quant_compute_dtype: Any = None,
    source: str = "checkpoint",
) -> CausalLM:
    """Build a model from per-module tensors ``{module_path: {"weight": ..., "bias": ...}}`` (HF layout).

    Float weights are numpy/jax arrays in torch layout; a projection's ``weight`` may instead be an
    ``Int8Weight`` / ``FourBitWeight``, which becomes a ``Linear8bit`` / ``Linear4bit`` base.

    Args:
      config: the architecture.
      modules: the tensors, grouped by HF module path.
      dtype: parameter dtype of float tensors (default: the embedding's dtype in the checkpoint). The
        embedding table takes it only when it is not wider than the checkpoint's (``_embed_dtype``).
      compute_dtype: the model's compute dtype (default: ``dtype``).
      quant_compute_dtype: compute dtype of 4-bit layers (bnb's ``bnb_4bit_compute_dtype``; default
        ``compute_dtype``). 8-bit layers compute in ``compute_dtype`` (bnb's ``MatMul8bitFp``).
      source: named in error messages.

    Raises:
      InteropError: a missing or unexpected tensor, or a shape that disagrees with the config (named).
    """
    embed = _require(modules, "model.embed_tokens", "weight", source)
    stored = _float_dtype(embed)
    dtype = jnp.dtype(dtype if dtype is not None else stored)
    compute_dtype = jnp.dtype(compute_dtype if compute_dtype is not None else dtype)
    quant_compute_dtype = jnp.dtype(quant_compute_dtype if quant_compute_dtype is not None else compute_dtype)
    model = nnx.eval_shape(
        lambda: CausalLM(
            config,
            rngs=nnx.Rngs(0),
            dtype=compute_dtype,
            param_dtype=dtype,
            embed_dtype=_embed_dtype(stored, dtype),
        )
    )
    used: set[str] = set()
    take = _taker(modules, used, source)
    take("model.embed_tokens", "weight", _get(model, "model.embed_tokens").embedding)
    for path in norm_modules(config):
        take(path, "weight", _get(model, path).weight)
    for path, has_bias in linear_modules(config):
        _take_linear(model, modules, path, has_bias, take, used, (compute_dtype, quant_compute_dtype), source)
    _check_all_used(config, modules, used, source)
    return model


def _embed_dtype(stored: np.dtype, dtype: np.dtype) -> np.dtype:
    """The embedding table's dtype: ``dtype``, unless that is wider than the checkpoint's (then the
    checkpoint's: a widened copy holds the same numbers in more bytes, and the table is the largest tensor).

    Example:
      >>> import ml_dtypes
      >>> _embed_dtype(np.dtype(ml_dtypes.bfloat16), np.dtype("float32")).name
      'bfloat16'
    """
    return stored if np.dtype(dtype).itemsize > np.dtype(stored).itemsize else np.dtype(dtype)


def _taker(modules: Mapping[str, Mapping[str, Any]], used: set[str], source: str):
    """``take(path, name, var, transpose=False)``: read tensor ``<path>.<name>`` into ``var`` (its dtype),
    after checking its shape against the config's; record it as used."""

    def take(path: str, name: str, var: nnx.Variable, transpose: bool = False) -> None:
        value = _load(_require(modules, path, name, source))
        want = tuple(var.shape[::-1] if transpose else var.shape)  # in the file's (torch) layout
        if tuple(value.shape) != want:
            raise InteropError(
                f"{source}: tensor {path}.{name} has shape {list(value.shape)}, "
                f"the config expects {list(want)}"
            )
        value = value.T if transpose else value
        var.set_value(jnp.array(value, var.dtype))  # a copy: ``value`` may be a view of the mapped file
        used.add(f"{path}.{name}")

    return take


def _take_linear(
    model: CausalLM,
    modules: Mapping[str, Mapping[str, Any]],
    path: str,
    has_bias: bool,
    take: Any,
    used: set[str],
    compute_dtypes: tuple[Any, Any],
    source: str,
) -> None:
    """One projection: float into the ``nnx.Linear``, or a quantized weight as its replacement."""
    layer = _get(model, path)
    weight = _require(modules, path, "weight", source)
    bias = modules[path].get("bias")
    if has_bias != (bias is not None):
        want = "a bias" if has_bias else "no bias"
        raise InteropError(f"{source}: module {path}: the config expects {want} ({path}.bias)")
    if isinstance(weight, Int8Weight | FourBitWeight):
        b = None if bias is None else jnp.array(_load(bias), layer.param_dtype)
        cd = compute_dtypes[0] if isinstance(weight, Int8Weight) else compute_dtypes[1]
        replace_module(model, path, _quantized_linear(path, layer, weight, b, cd, source))
        used.update({f"{path}.weight"} | ({f"{path}.bias"} if bias is not None else set()))
        return
    take(path, "weight", layer.kernel, transpose=True)
    if bias is not None:
        take(path, "bias", layer.bias)


def _quantized_linear(
    path: str,
    layer: nnx.Linear,
    weight: Int8Weight | FourBitWeight,
    bias: Any,
    compute_dtype: Any,
    source: str,
) -> Any:
    """The ``Linear8bit`` / ``Linear4bit`` replacing the float ``layer`` at ``path`` (shape checked)."""
    from oftjax.nn import Linear4bit, Linear8bit

    want = (layer.out_features, layer.in_features)
    if tuple(weight.shape) != want:
        raise InteropError(
            f"{source}: quantized {path}.weight has shape {list(weight.shape)}, the config expects "
            f"{list(want)}"
        )
    cls = Linear8bit if isinstance(weight, Int8Weight) else Linear4bit
    return cls(_to_jax(weight), bias, compute_dtype=compute_dtype)


def _check_all_used(
    config: ModelConfig, modules: Mapping[str, Mapping[str, Any]], used: set[str], source: str
) -> None:
    extra = sorted(
        f"{p}.{n}"
        for p, ts in modules.items()
        for n in ts
        if f"{p}.{n}" not in used
        and not f"{p}.{n}".endswith(_IGNORED_SUFFIXES)
        and not (config.tie_word_embeddings and p == "lm_head")  # a tied copy some writers keep
    )
    if extra:
        raise InteropError(f"{source}: unexpected tensor(s) for this {config.model_type} config: {extra[:8]}")


def _require(modules: Mapping[str, Mapping[str, Any]], path: str, name: str, source: str) -> Any:
    try:
        return modules[path][name]
    except KeyError:
        raise InteropError(f"{source}: missing tensor {path}.{name}") from None


def _float_dtype(x: Any) -> np.dtype:
    dt = np.dtype(x.dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise InteropError(f"expected a float embedding (model.embed_tokens.weight), got {dt}")
    return dt


def _load(x: Any) -> np.ndarray:
    # Lazy tensors of a memory-mapped file (``LazyTensor``): a read-only view of the mapped bytes, not a
    # copy (the caller copies once, into the model's array).
    if hasattr(x, "raw"):
        return np.frombuffer(x.raw(), dtype=x.dtype).reshape(x.shape)
    return x.load() if hasattr(x, "load") else np.asarray(x)


def _to_jax(q: Int8Weight | FourBitWeight) -> Any:
    return jax.tree.map(lambda x: jnp.array(_load(x)), q)


# --------------------------------------------------------------------------------------- model -> tensors


def modules_from_model(model: CausalLM) -> dict[str, dict[str, Any]]:
    """The inverse of ``model_from_modules``: ``{module_path: {"weight": ..., "bias": ...}}`` in HF layout.

    Float tensors are numpy in their parameter dtype (kernels transposed to ``[out, in]``); quantized bases
    give their ``Int8Weight`` / ``FourBitWeight`` (numpy leaves). OFT-wrapped layers give their base tensors
    only (merge first to save the adapted weights).
    """
    config = model.config
    out: dict[str, dict[str, Any]] = {
        "model.embed_tokens": {"weight": _np(_get(model, "model.embed_tokens").embedding)}
    }
    for path in norm_modules(config):
        out[path] = {"weight": _np(_get(model, path).weight)}
    for path in linear_paths(config):
        layer = _get(model, path)
        tensors: dict[str, Any] = {}
        if hasattr(layer, "kernel"):  # nnx.Linear
            tensors["weight"] = _np(layer.kernel).T
        elif hasattr(layer, "weight"):
            tensors["weight"] = jax.tree.map(np.asarray, layer.weight.get_value())
        else:
            raise TypeError(f"{path}: cannot save a {type(layer).__name__} (no kernel or weight)")
        bias = getattr(layer, "bias", None)
        if bias is not None:
            tensors["bias"] = _np(bias)
        out[path] = tensors
    return out


def _np(var: Any) -> np.ndarray:
    return np.asarray(var[...] if isinstance(var, nnx.Variable) else var)


# ------------------------------------------------------------------------------------------ directories


def load_model(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    compute_dtype: Any = None,
    strict: bool = False,
    allow_symlinks: bool = False,
) -> CausalLM:
    """Load an HF checkpoint directory (float, bnb 8-bit or 4-bit) of an ``oftjax.models`` family into JAX.

    Quantized projections stay packed (``Linear8bit`` / ``Linear4bit``); 4-bit layers compute in the
    checkpoint's ``bnb_4bit_compute_dtype`` unless ``compute_dtype`` is given.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      dtype: float parameter dtype, "float32" / "bfloat16" or a dtype (default: the checkpoint's). On a CPU
        pass float32 for a bf16 checkpoint: XLA:CPU computes bfloat16 slowly (``oftjax train`` does). The
        embedding table is never widened (it keeps a bf16 checkpoint's bf16; ``model_from_modules``).
      compute_dtype: activation dtype (default: ``dtype``).
      strict: also refuse config keys the key policy does not know (``ModelConfig.from_hf``); by default
        they are accepted with one warning. Keys whose value changes math oftjax lacks are always refused.
      allow_symlinks: follow symbolic links that stay inside ``path`` (``interop.hf.read_checkpoint``: its
        files are untrusted; a Hugging Face cache snapshot's links into its blobs are always followed).

    Example:
      >>> model = load_model("tiny-llama-nf4")      # doctest: +SKIP
      >>> logits = model(jnp.array([[1, 2, 3]]))     # doctest: +SKIP
    """
    path = Path(path)
    hf_config, modules = _read(path, allow_symlinks)
    try:
        config = ModelConfig.from_hf(hf_config, strict=strict)
    except UnsupportedConfigError as e:  # the keys strict refuses: name the file
        raise UnsupportedConfigError(f"{path / hf.CONFIG}: {e}") from None
    qcfg = hf_config.get("quantization_config") or {}
    modules = _quantize_float_int8_weights(config, modules, qcfg, str(path))
    quant_cd = compute_dtype
    if quant_cd is None and qcfg.get("load_in_4bit"):
        quant_cd = qcfg.get("bnb_4bit_compute_dtype") or "float32"
    model = model_from_modules(
        config,
        modules,
        dtype=dtype,
        compute_dtype=compute_dtype,
        quant_compute_dtype=quant_cd,
        source=str(path),
    )
    _set_int8_threshold(model, qcfg)
    return model


def _quantize_float_int8_weights(
    config: ModelConfig, modules: Mapping[str, Mapping[str, Any]], qcfg: Mapping[str, Any], source: str
) -> Mapping[str, Mapping[str, Any]]:
    """``llm_int8_has_fp16_weight``: the 8-bit projections are stored float and bitsandbytes quantizes them
    (``int8_vectorwise_quant`` of the float16 cast) at every forward, train and eval alike; a frozen weight
    gives the same codes each time, so they are quantized once here (``quantize_int8``, the same bits). The
    modules are those transformers converts: every projection and ``lm_head`` except what
    ``llm_int8_skip_modules`` names, or except ``lm_head`` when there is no list. ``save_model`` writes such a
    model as a plain 8-bit checkpoint (codes and scales), which transformers can load back."""
    from oftjax.quant import quantize_int8

    eight = qcfg.get("load_in_8bit", qcfg.get("_load_in_8bit", False))
    if not (eight and qcfg.get("llm_int8_has_fp16_weight")):
        return modules
    skip = qcfg.get("llm_int8_skip_modules")
    out = dict(modules)
    for path in linear_paths(config):
        weight = modules.get(path, {}).get("weight")
        if weight is None or isinstance(weight, Int8Weight | FourBitWeight):
            continue
        if (path == "lm_head" and skip is None) or _skipped(path, skip or [], source):
            continue
        out[path] = {**modules[path], "weight": quantize_int8(jnp.asarray(_load(weight)))}
    return out


def _skipped(path: str, patterns: list[str], source: str) -> bool:
    """transformers' ``should_convert_module`` negated: a pattern skips ``path`` when it is a suffix of it
    or matches a prefix that ends at a module boundary (``.`` before or after, or the end). Patterns from the
    file run on the linear-time matcher (``oftjax.config``), never on a backtracking engine."""
    from oftjax.config import PatternError, compile_pattern

    ends = [i for i in range(len(path) + 1) if i == len(path) or path[i] == "." or path[i - 1 : i] == "."]
    for key in patterns:
        if path.endswith(key):
            return True
        try:
            pattern = compile_pattern(key)
        except PatternError as e:
            raise InteropError(
                f"{source}: quantization_config.llm_int8_skip_modules {key!r:.80}: {e}"
            ) from None
        if any(pattern.fullmatch(path[:i]) for i in ends):
            return True
    return False


def _set_int8_threshold(model: Any, qcfg: Mapping[str, Any]) -> None:
    """8-bit layers take ``llm_int8_threshold`` (transformers' default 6.0), which their LLM.int8 (eval)
    forward uses to keep outlier input columns in float, as bnb's ``Linear8bitLt(threshold=...)``."""
    from oftjax.nn import Linear8bit

    if qcfg.get("load_in_8bit", qcfg.get("_load_in_8bit", False)):
        threshold = float(qcfg.get("llm_int8_threshold", 6.0))
        model.set_attributes(Linear8bit, threshold=threshold, raise_if_not_found=False)


def save_model(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    force: bool = False,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write ``model`` as an HF checkpoint directory that transformers ``from_pretrained`` loads.

    Quantized layers are written in bitsandbytes' serialization with a matching ``quantization_config``; an
    OFT-wrapped model saves its base weights only (call ``oftjax.merge`` first to save adapted weights, or
    ``interop.peft.save_adapter`` for the adapter). Atomic; refuses an existing ``path`` unless ``force``.
    Shards (``model-0000i-of-0000N.safetensors`` + index) beyond ``max_shard_size`` (bytes or "5GB").

    Example:
      >>> save_model(model, "runs/base")                       # doctest: +SKIP
      >>> load_model("runs/base")                              # doctest: +SKIP
    """
    modules = modules_from_model(model)
    hf_config = model.config.to_hf(dtype=_checkpoint_dtype(modules))
    qcfg = quantization_config(model)
    if qcfg is not None:
        hf_config["quantization_config"] = qcfg
    _write(Path(path), hf_config, modules, force=force, max_shard_size=max_shard_size)


def _checkpoint_dtype(modules: Mapping[str, Mapping[str, Any]]) -> str:
    """The config's ``dtype``: the widest float dtype among the float tensors, so that transformers'
    ``dtype="auto"`` narrows nothing (a bf16 embedding table beside float32 layers loads as float32).

    Example:
      >>> import ml_dtypes
      >>> _checkpoint_dtype({"a": {"weight": np.zeros(2, ml_dtypes.bfloat16)}, "b": {"weight": np.zeros(2)}})
      'float64'
    """
    floats = [
        np.dtype(t.dtype)
        for tensors in modules.values()
        for t in tensors.values()
        if isinstance(t, np.ndarray) and jnp.issubdtype(t.dtype, jnp.floating)
    ]
    return str(max(floats, key=lambda d: d.itemsize))


def quantization_config(model: CausalLM) -> dict[str, Any] | None:
    """The transformers ``BitsAndBytesConfig`` dict describing ``model``'s quantized layers (None if float).

    Float projections among quantized ones are listed in ``llm_int8_skip_modules`` (full module paths, which
    transformers matches from the start), with ``lm_head`` when it is float, so ``from_pretrained`` keeps them
    float; a float ``lm_head`` alone needs no list (transformers never quantizes it).

    Raises:
      ValueError: the quantized layers mix formats one bitsandbytes config cannot describe.
    """
    kinds, floats = set(), []
    for path in linear_paths(model.config):
        layer = _get(model, path)
        if hasattr(layer, "kernel"):
            floats.append(path)
            continue
        q = layer.weight.get_value()
        if isinstance(q, Int8Weight):
            kinds.add(("int8", float(getattr(layer, "threshold", 6.0))))
        else:
            storage, cd = np.dtype(q.packed.dtype).name, jnp.dtype(layer.compute_dtype).name
            kinds.add(("4bit", q.quant_type, q.compress_statistics, storage, cd))
    if not kinds:
        return None
    if len(kinds) != 1:
        raise ValueError(f"cannot describe mixed layer formats {sorted(kinds)} with one bitsandbytes config")
    (kind,) = kinds
    if kind[0] == "int8":
        out = hf.bnb_quantization_config("int8", threshold=kind[1])
    else:
        _, quant_type, dq, storage, cd = kind
        out = hf.bnb_quantization_config(
            "4bit", quant_type=quant_type, use_double_quant=dq, quant_storage=storage, compute_dtype=cd
        )
    if floats and floats != ["lm_head"]:
        out["llm_int8_skip_modules"] = floats
    return out


def _read(path: Path, allow_symlinks: bool = False) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """config.json + ``{module_path: {name: leaf}}`` (``interop.hf.read_checkpoint``, memory-mapped)."""
    return hf.read_checkpoint(path, lazy=True, allow_symlinks=allow_symlinks)


def _write(path: Path, hf_config: dict[str, Any], modules: dict[str, dict[str, Any]], **kw: Any) -> None:
    hf.write_checkpoint(path, hf_config, modules, **kw)
