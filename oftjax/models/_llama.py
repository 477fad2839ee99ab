"""A Llama-family causal LM (Llama, Mistral, Qwen2) in Flax NNX, mirroring transformers 5.24's modules.

Module paths match the HF/PEFT names (``model.layers.0.self_attn.q_proj``, ``model.norm``, ``lm_head``) so
adapters attach by name and checkpoints map one to one. Projections are plain ``nnx.Linear`` (kernel
``[in, out]``); the loader may swap them for ``oftjax.nn.Linear8bit`` / ``Linear4bit`` and ``apply_oft`` wraps
them, so the modules here call each projection and cast its output to the compute dtype, nothing more.

Sharding: every parameter carries NNX partitioning metadata (``sharding_names``) over the mesh axes
``AXIS_DATA`` ("data", the batch) and ``AXIS_FSDP`` ("fsdp", fully sharded parameters): kernels and embeddings
shard their first axis over "fsdp", vectors are replicated. ``nnx.get_partition_spec(nnx.state(model))`` gives
the specs for a ``Mesh(devices, ("data", "fsdp"))``. No tensor-parallel axis is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from oftjax._registry import operation
from oftjax.models._attention import causal_attention, masked_attention
from oftjax.models._config import ModelConfig
from oftjax.models._rope import apply_rope, rope_cos_sin

AXIS_DATA = "data"
AXIS_FSDP = "fsdp"


def _meta(*names: str | None) -> dict:
    # Eager sharding needs a mesh at construction; without one we only annotate (shard later with the specs).
    return {"sharding_names": names, "eager_sharding": False}


def _linear(cfg: ModelConfig, n_in: int, n_out: int, bias: bool, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(cfg.extra.get("initializer_range", 0.02)),
        kernel_metadata=_meta(AXIS_FSDP, None),
        bias_metadata=_meta(None),
        rngs=rngs,
    )


def _project(layer, x: jax.Array) -> jax.Array:
    # Quantized bases compute in their own dtype; the residual stream stays in the model's compute dtype.
    return layer(x).astype(x.dtype)


class RMSNorm(nnx.Module):
    """HF ``LlamaRMSNorm``: normalize in float32, cast back to the input dtype, then times ``weight``."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **_meta(None))
        self.eps = eps

    @jax.named_scope("rms_norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.float32(self.eps))
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings; softmax in float32 as HF's eager path.

    Without a padding mask the mask is causal (optionally windowed) and ``causal_attention`` computes it
    block by block (RoPE inside; a CPU kernel replaces it when ``oftjax.cpu_kernels`` is enabled); with a
    padding mask the full score matrix is kept (``masked_attention``), as HF does.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(cfg, d, cfg.num_attention_heads * hd, cfg.qkv_bias, dtype, param_dtype, rngs)
        self.k_proj = _linear(cfg, d, cfg.num_key_value_heads * hd, cfg.qkv_bias, dtype, param_dtype, rngs)
        self.v_proj = _linear(cfg, d, cfg.num_key_value_heads * hd, cfg.qkv_bias, dtype, param_dtype, rngs)
        self.o_proj = _linear(cfg, cfg.num_attention_heads * hd, d, cfg.o_bias, dtype, param_dtype, rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        *,
        causal_only: bool = False,
        window: int | None = None,
    ) -> jax.Array:
        """``causal_only``: ``mask`` is exactly the causal mask (with sliding ``window``), no padding."""
        b, s, _ = x.shape
        kv, hd = self.num_kv_heads, self.head_dim
        q = _project(self.q_proj, x).reshape(b, s, self.num_heads, hd)
        k = _project(self.k_proj, x).reshape(b, s, kv, hd)
        v = _project(self.v_proj, x).reshape(b, s, kv, hd)
        with jax.named_scope("attention"):
            if causal_only:
                out = causal_attention(q, k, v, cos, sin, scale=hd**-0.5, window=window)
            else:
                with jax.named_scope("rope"):
                    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                out = masked_attention(q, k, v, mask, scale=hd**-0.5)
        return _project(self.o_proj, out.reshape(b, s, self.num_heads * hd))


@operation("swiglu")
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` (HF's ``act_fn(gate_proj(x)) * up_proj(x)``); a named operation (a CPU kernel
    replaces it when ``oftjax.cpu_kernels`` is enabled).

    Example:
      >>> import jax.numpy as jnp
      >>> float(swiglu(jnp.float32(0.0), jnp.float32(3.0)))
      0.0
    """
    return jax.nn.silu(gate) * up


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` (``swiglu``)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(cfg, d, i, bias, dtype, param_dtype, rngs)
        self.up_proj = _linear(cfg, d, i, bias, dtype, param_dtype, rngs)
        self.down_proj = _linear(cfg, i, d, bias, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = _project(self.gate_proj, x), _project(self.up_proj, x)
        with jax.named_scope("swiglu"):
            h = swiglu(gate, up)
        return _project(self.down_proj, h)


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype
        )

    def __call__(
        self,
        h: jax.Array,
        mask: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        *,
        causal_only: bool = False,
        window: int | None = None,
    ) -> jax.Array:
        attn = self.self_attn(self.input_layernorm(h), mask, cos, sin, causal_only=causal_only, window=window)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h))


def causal_mask(
    seq_len: int, attention_mask: jax.Array | None, window: int | None, batch: int = 1
) -> jax.Array:
    """Boolean ``[batch, q, k]``: causal (``k <= q``), windowed (``k > q - window``) and ``attention_mask``.

    ``attention_mask`` is None, a key-padding mask ``[batch, k]`` (1/True: a real token) or a full mask
    ``[batch, q, k]`` (True: may attend; e.g. ``segment_mask`` for packed examples), combined with the
    causal and window mask. Built from sequence indices like transformers' ``create_causal_mask`` (not from
    ``positions``).
    """
    q = jnp.arange(seq_len)[:, None]
    k = jnp.arange(seq_len)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    if attention_mask is None:
        return jnp.broadcast_to(allowed, (batch, seq_len, seq_len))
    if attention_mask.ndim == 3:
        return allowed[None] & attention_mask.astype(jnp.bool_)
    return allowed[None] & attention_mask.astype(jnp.bool_)[:, None, :]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """The ``[batch, q, k]`` attention mask of packed rows: a token attends only within its own example.

    Args:
      segment_ids: int ``[batch, seq]``, the example each token belongs to (equal ids: same example). Pass
        the result as ``attention_mask`` with ``positions`` restarting at 0 for each example.

    Example:
      >>> segment_mask(jnp.array([[0, 0, 1]])).astype(int)[0]
      Array([[1, 1, 0],
             [1, 1, 0],
             [0, 0, 1]], dtype=int32)
    """
    return segment_ids[:, :, None] == segment_ids[:, None, :]


def _layer_call(causal_only: bool, window: int | None):
    # Static settings closed over, not passed: nnx.remat would trace keyword arguments as arrays.
    def call(layer: DecoderLayer, h: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        return layer(h, mask, cos, sin, causal_only=causal_only, window=window)

    return call


class LlamaModel(nnx.Module):
    """The decoder stack: ``embed_tokens``, ``layers`` (an ``nnx.List``) and the final ``norm``."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, remat: bool, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype, self.remat = dtype, remat
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(cfg.extra.get("initializer_range", 0.02)),
            embedding_metadata=_meta(AXIS_FSDP, None),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        b, s = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) not in ((b, s), (b, s, s)):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected [batch, seq] = {[b, s]} "
                f"(key padding) or [batch, seq, seq] = {[b, s, s]} (who may attend to whom)"
            )
        h = self.embed_tokens(input_ids)
        if positions is None:
            positions = jnp.arange(s)
        positions = jnp.broadcast_to(positions, (b, s))
        cos, sin = rope_cos_sin(self.config, positions, h.dtype)
        masks = {
            w: causal_mask(s, attention_mask, w, b)
            for w in set(map(self.config.window, range(len(self.layers))))
        }
        causal_only = attention_mask is None  # no mask given: causal (and windowed) only
        for i, layer in enumerate(self.layers):
            window = self.config.window(i)
            call = _layer_call(causal_only, window)
            if self.remat:
                h = nnx.remat(call)(layer, h, masks[window], cos, sin)
            else:
                h = call(layer, h, masks[window], cos, sin)
        return self.norm(h)


class LlamaForCausalLM(nnx.Module):
    """Llama / Mistral / Qwen2 causal LM: ``model`` (``LlamaModel``) and ``lm_head`` (None when tied).

    Args:
      config: the architecture (``ModelConfig.from_hf(config_json)``).
      rngs: initializer randomness (normal(0, initializer_range) kernels and embeddings, ones for norms).
      dtype: compute dtype (activations, matmul inputs); RMSNorm statistics and softmax stay float32.
      param_dtype: parameter dtype (e.g. float32 parameters with bfloat16 compute).
      remat: rematerialize each decoder layer in the backward pass (``nnx.remat``).

    Example:
      >>> cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      ...     num_attention_heads=2, num_key_value_heads=1, head_dim=8)
      >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 5), jnp.int32)).shape
      (2, 5, 32)
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
    ):
        self.config = config
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _linear(config, config.hidden_size, config.vocab_size, False, dtype, param_dtype, rngs)
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``[batch, seq, vocab]`` in the compute dtype.

        Args:
          input_ids: int ``[batch, seq]``.
          attention_mask: ``[batch, seq]``, 1/True for real tokens, 0/False for padding (keys only, as HF);
            or ``[batch, seq, seq]``, True where query ``i`` may attend to key ``j`` (packed examples:
            ``segment_mask``), combined with the causal and sliding-window mask. Either form computes the
            full score matrix (``masked_attention``).
          positions: int ``[seq]`` or ``[batch, seq]`` rotary positions; default ``arange(seq)`` (HF's
            forward does the same, whatever the padding); restart them per example in packed rows.
        """
        h = self.model(input_ids, attention_mask, positions)
        with jax.named_scope("gemm"):  # a profile label (benchmarks/profile_train.py), nothing else
            if self.lm_head is None:
                # the base table (an OFT-adapted embedding rotates its lookups, not the tied head: PEFT)
                embed = self.model.embed_tokens
                emb = getattr(embed, "base_layer", embed).embedding[...].astype(h.dtype)
                return h @ emb.T
            return _project(self.lm_head, h)


MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM
