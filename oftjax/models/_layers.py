"""The small modules the decoder is built from: projections, RMSNorms, gated MLPs, the embedding table.

Projections are plain ``nnx.Linear`` (kernel ``[in, out]``); the loader may swap them for
``oftjax.nn.Linear8bit`` / ``Linear4bit`` and ``apply_oft`` wraps them, so the modules here call each
projection and cast its output to the compute dtype, nothing more. Every parameter carries NNX partitioning
metadata (``sharding_names``) over the mesh axes ``AXIS_DATA`` / ``AXIS_FSDP``: kernels and embeddings shard
their first axis over "fsdp", vectors are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oftjax._registry import operation
from oftjax.models._config import ModelConfig

AXIS_DATA = "data"
AXIS_FSDP = "fsdp"


def meta(*names: str | None) -> dict:
    """NNX partitioning metadata; eager sharding needs a mesh at construction, so we only annotate."""
    return {"sharding_names": names, "eager_sharding": False}


def linear(cfg: ModelConfig, n_in: int, n_out: int, bias: bool, dtype, param_dtype, rngs) -> nnx.Linear:
    """An ``nnx.Linear`` initialized like transformers (normal(0, initializer_range)), fsdp-annotated."""
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(cfg.extra.get("initializer_range", 0.02)),
        kernel_metadata=meta(AXIS_FSDP, None),
        bias_metadata=meta(None),
        rngs=rngs,
    )


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """Gemma's soft-capping ``cap * tanh(x / cap)`` in ``x``'s dtype (transformers' order: divide, tanh,
    multiply), for attention scores and output logits."""
    c = jnp.asarray(cap, x.dtype)
    return jnp.tanh(x / c) * c


def project(layer: Any, x: jax.Array) -> jax.Array:
    """``layer(x)`` in the compute dtype: quantized bases compute in their own dtype; the residual stream
    stays in the model's."""
    return layer(x).astype(x.dtype)


class RMSNorm(nnx.Module):
    """HF's RMSNorm over the last axis, statistics in float32.

    ``unit_offset=False`` (Llama, Qwen, Phi-3): normalize in float32, cast back to the input dtype, then
    times ``weight`` (initialized to ones). ``unit_offset=True`` (Gemma): times ``1 + weight`` in float32,
    then cast back (``weight`` initialized to zeros).
    """

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, unit_offset: bool = False):
        init = jnp.zeros if unit_offset else jnp.ones
        self.weight = nnx.Param(init((dim,), param_dtype), **meta(None))
        self.eps = eps
        self.unit_offset = unit_offset

    @jax.named_scope("rms_norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.float32(self.eps))
        w = self.weight[...]
        if self.unit_offset:
            return (x32 * (jnp.float32(1.0) + w.astype(jnp.float32))).astype(x.dtype)
        return w.astype(x.dtype) * x32.astype(x.dtype)


def norm(cfg: ModelConfig, dim: int, param_dtype) -> RMSNorm:
    """The family's RMSNorm of width ``dim``."""
    return RMSNorm(
        dim, eps=cfg.rms_norm_eps, param_dtype=param_dtype, unit_offset=cfg.family.norm_unit_offset
    )


@operation("swiglu")
@jax.custom_jvp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` (HF's ``act_fn(gate_proj(x)) * up_proj(x)``); a named operation (a CPU kernel
    replaces it when ``oftjax.cpu_kernels`` is enabled).

    The derivative is torch's ``silu_backward``, ``s (1 + gate (1 - s))`` with ``s = sigmoid(gate)``: autodiff
    of ``gate * sigmoid(gate)`` would form ``(gate * cotangent) * sigmoid'(gate)``, which is ``inf * 0 = nan``
    for ``|gate|`` near float32's largest values where torch's (and the kernel's) gradient is finite.

    Example:
      >>> import jax.numpy as jnp
      >>> float(swiglu(jnp.float32(0.0), jnp.float32(3.0)))
      0.0
    """
    return jax.nn.silu(gate) * up


@swiglu.default.defjvp
def _swiglu_jvp(primals, tangents):
    gate, up = primals
    d_gate, d_up = tangents
    s = jax.nn.sigmoid(gate)
    silu = gate * s
    return silu * up, (s * (1 + gate * (1 - s))) * d_gate * up + silu * d_up


def geglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``gelu_tanh(gate) * up`` (Gemma's ``gelu_pytorch_tanh`` MLP); plain JAX.

    Example:
      >>> float(geglu(jnp.float32(0.0), jnp.float32(3.0)))
      0.0
    """
    return jax.nn.gelu(gate, approximate=True) * up


def _gated(cfg: ModelConfig, gate: jax.Array, up: jax.Array) -> jax.Array:
    if cfg.hidden_act == "silu":
        with jax.named_scope("swiglu"):
            return swiglu(gate, up)
    with jax.named_scope("geglu"):
        return geglu(gate, up)


class MLP(nnx.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))``: SwiGLU (``swiglu``) or GeGLU (``geglu``), by hidden_act."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.config = cfg
        self.gate_proj = linear(cfg, d, i, bias, dtype, param_dtype, rngs)
        self.up_proj = linear(cfg, d, i, bias, dtype, param_dtype, rngs)
        self.down_proj = linear(cfg, i, d, bias, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = project(self.gate_proj, x), project(self.up_proj, x)
        return project(self.down_proj, _gated(self.config, gate, up))


class FusedMLP(nnx.Module):
    """Phi-3's gated MLP: one ``gate_up_proj`` (gate rows first, then up), ``down(act(gate) * up)``."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.config = cfg
        self.gate_up_proj = linear(cfg, d, 2 * i, False, dtype, param_dtype, rngs)
        self.down_proj = linear(cfg, i, d, False, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(project(self.gate_up_proj, x), 2, axis=-1)
        return project(self.down_proj, _gated(self.config, gate, up))


class Embedding(nnx.Embed):
    """``nnx.Embed`` that looks rows up in the table's own dtype and casts only those rows.

    ``nnx.Embed`` promotes the whole table to the compute dtype before the lookup: with a bfloat16 table and
    float32 compute that is a float32 copy of the table (Gemma 3: 262,144 rows) per call. ``scale``
    multiplies the rows (Gemma: sqrt(hidden_size), rounded to the compute dtype as transformers rounds it
    to its weight dtype, which is its compute dtype).
    """

    def __init__(self, *args: Any, scale: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"embedding inputs must be integers, got {inputs.dtype}")
        table = self.embedding[...]
        if out_sharding is None:
            rows = jnp.take(table, inputs, axis=0)
        else:  # explicit sharding mode, as nnx.Embed
            take = jax.sharding.auto_axes(lambda t, i: jnp.take(t, i, axis=0), out_sharding=out_sharding)
            rows = take(table, inputs)
        dtype = self.dtype if self.dtype is not None else rows.dtype
        rows = rows.astype(dtype)
        if self.scale is None:
            return rows
        # transformers: torch.tensor(scale) (float32), then .to(the weight dtype)
        return rows * jnp.asarray(np.float32(self.scale), dtype)
