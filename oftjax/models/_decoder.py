"""One causal-LM decoder for every family in ``_families.py``, in Flax NNX, mirroring transformers 5.24.

Module paths match the HF/PEFT names (``model.layers.0.self_attn.q_proj``, Phi-3's ``self_attn.qkv_proj`` and
``mlp.gate_up_proj``, Gemma's ``pre_feedforward_layernorm``, ``model.norm``, ``lm_head``) so adapters attach
by name and checkpoints map one to one; ``linear_modules`` / ``norm_modules`` list them for a config. The
family (``ModelConfig.family``) picks the pieces: q/k norms, fused projections, four norms per layer, the
embedding scale, soft-capping. ``LlamaForCausalLM``, ``Gemma2ForCausalLM``, ... are names of ``CausalLM``.

Sharding: every parameter carries NNX partitioning metadata (``sharding_names``) over the mesh axes
``AXIS_DATA`` ("data", the batch) and ``AXIS_FSDP`` ("fsdp", fully sharded parameters): kernels and embeddings
shard their first axis over "fsdp", vectors are replicated. ``nnx.get_partition_spec(nnx.state(model))`` gives
the specs for a ``Mesh(devices, ("data", "fsdp"))``. No tensor-parallel axis is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from oftjax.models._attention import causal_attention, masked_attention, softcapped_causal_attention
from oftjax.models._config import ModelConfig
from oftjax.models._kv_cache import KVCache
from oftjax.models._layers import AXIS_FSDP, MLP, Embedding, FusedMLP, linear, meta, norm, project, soft_cap
from oftjax.models._rope import apply_rope, rope_cos_sin


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings; softmax in float32 as HF's eager path.

    Projections: ``q_proj``/``k_proj``/``v_proj`` or Phi-3's fused ``qkv_proj`` (q rows, then k, then v);
    Qwen3 and Gemma 3 normalize each head of q and k (``q_norm``/``k_norm``) before RoPE. Without a mask
    argument the mask is causal (optionally windowed) and ``causal_attention`` computes it block by block
    (RoPE inside; a CPU kernel replaces it when ``oftjax.cpu_kernels`` is enabled), or
    ``softcapped_causal_attention`` when the scores are soft-capped (Gemma 2); with a mask the full score
    matrix is kept (``masked_attention``), as HF does.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        self.fused = cfg.family.fused_projections
        if self.fused:
            self.qkv_proj = linear(cfg, d, nq + 2 * nkv, cfg.qkv_bias, dtype, param_dtype, rngs)
        else:
            self.q_proj = linear(cfg, d, nq, cfg.qkv_bias, dtype, param_dtype, rngs)
            self.k_proj = linear(cfg, d, nkv, cfg.qkv_bias, dtype, param_dtype, rngs)
            self.v_proj = linear(cfg, d, nkv, cfg.qkv_bias, dtype, param_dtype, rngs)
        self.o_proj = linear(cfg, nq, d, cfg.o_bias, dtype, param_dtype, rngs)
        self.qk_norm = cfg.family.qk_norm
        if self.qk_norm:
            self.q_norm = norm(cfg, hd, param_dtype)
            self.k_norm = norm(cfg, hd, param_dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.scale, self.softcap = cfg.attention_scale, cfg.attn_logit_softcapping

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, s, _ = x.shape
        hd, nq, nkv = self.head_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.fused:
            q, k, v = jnp.split(project(self.qkv_proj, x), [nq, nq + nkv], axis=-1)
        else:
            q, k, v = project(self.q_proj, x), project(self.k_proj, x), project(self.v_proj, x)
        q, k, v = q.reshape(b, s, -1, hd), k.reshape(b, s, -1, hd), v.reshape(b, s, -1, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

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
        """``causal_only``: ``mask`` is exactly the causal mask (with sliding ``window``), no other mask."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x)
        with jax.named_scope("attention"):
            if causal_only and self.softcap is None:
                out = causal_attention(q, k, v, cos, sin, scale=self.scale, window=window)
            else:
                with jax.named_scope("rope"):
                    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                if causal_only:
                    out = softcapped_causal_attention(
                        q, k, v, scale=self.scale, window=window, softcap=self.softcap
                    )
                else:
                    out = masked_attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
        return project(self.o_proj, out.reshape(b, s, self.num_heads * self.head_dim))

    def cached(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        start: jax.Array,
        mask: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention of the tokens ``x [b, t, hidden]`` in cache slots ``[start, start + t)`` over the cache.

        Their keys and values (after RoPE) are written into ``cache = (keys, values)`` (``[b, max_len, kv,
        head_dim]``) first; ``mask [b, t, max_len]`` says which slots each query sees. Returns the output and
        the updated cache.
        """
        b, t, _ = x.shape
        q, k, v = self._qkv(x)
        with jax.named_scope("rope"):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), start, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype), start, axis=1)
        with jax.named_scope("attention"):
            out = masked_attention(q, keys, values, mask, scale=self.scale, softcap=self.softcap)
        return project(self.o_proj, out.reshape(b, t, self.num_heads * self.head_dim)), (keys, values)


class DecoderLayer(nnx.Module):
    """Pre-norm block ``h + attn(norm(h))``, ``h + mlp(norm(h))``; Gemma (``sandwich_norms``) also normalizes
    each branch's output: ``h + post_attention_layernorm(attn(input_layernorm(h)))``, then
    ``h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        mlp = FusedMLP if cfg.family.fused_projections else MLP
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = mlp(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = norm(cfg, cfg.hidden_size, param_dtype)
        self.post_attention_layernorm = norm(cfg, cfg.hidden_size, param_dtype)
        self.sandwich = cfg.family.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm(cfg, cfg.hidden_size, param_dtype)
            self.post_feedforward_layernorm = norm(cfg, cfg.hidden_size, param_dtype)

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
        return self._residuals(h, attn)

    def cached(self, h, cos, sin, cache, start, mask) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The layer over cache slots ``[start, start + t)`` (``Attention.cached``); the updated cache too."""
        attn, cache = self.self_attn.cached(self.input_layernorm(h), cos, sin, cache, start, mask)
        return self._residuals(h, attn), cache

    def _residuals(self, h: jax.Array, attn: jax.Array) -> jax.Array:
        if not self.sandwich:
            h = h + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


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


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Rotary positions of packed rows: restarting at 0 where the segment id changes along each row (int32,
    the shape of ``segment_ids``; numpy or jax input, traceable).

    Example:
      >>> segment_positions(jnp.array([[1, 1, 1, 2, 2, 0]])).tolist()
      [[0, 1, 2, 0, 1, 0]]
    """
    seg = jnp.asarray(segment_ids)
    index = jnp.broadcast_to(jnp.arange(seg.shape[-1], dtype=jnp.int32), seg.shape)
    starts = jnp.concatenate([jnp.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], axis=-1)
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=seg.ndim - 1)
    return index - first


def _layer_call(causal_only: bool, window: int | None):
    # Static settings closed over, not passed: nnx.remat would trace keyword arguments as arrays.
    def call(layer: DecoderLayer, h: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        return layer(h, mask, cos, sin, causal_only=causal_only, window=window)

    return call


class DecoderModel(nnx.Module):
    """The decoder stack: ``embed_tokens``, ``layers`` (an ``nnx.List``) and the final ``norm``."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, embed_dtype, remat: bool, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype, self.remat = dtype, remat
        self.embed_tokens = Embedding(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=embed_dtype,
            embedding_init=nnx.initializers.normal(cfg.extra.get("initializer_range", 0.02)),
            embedding_metadata=meta(AXIS_FSDP, None),
            rngs=rngs,
            scale=cfg.hidden_size**0.5 if cfg.family.scaled_embedding else None,
        )
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = norm(cfg, cfg.hidden_size, param_dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """The final hidden states ``[batch, seq, hidden]`` (after ``norm``); arguments as ``CausalLM``."""
        b, s = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) not in ((b, s), (b, s, s)):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected [batch, seq] = {[b, s]} "
                f"(key padding) or [batch, seq, seq] = {[b, s, s]} (who may attend to whom)"
            )
        cfg = self.config
        h = self.embed_tokens(input_ids)
        positions = jnp.broadcast_to(jnp.arange(s) if positions is None else positions, (b, s))
        types = cfg.attention_types
        ropes = {t: rope_cos_sin(cfg, positions, h.dtype, t) for t in sorted(set(types))}
        masks = {
            w: causal_mask(s, attention_mask, w, b) for w in set(map(cfg.window, range(len(self.layers))))
        }
        causal_only = attention_mask is None  # no mask given: causal (and windowed) only
        for i, layer in enumerate(self.layers):
            window = cfg.window(i)
            call = _layer_call(causal_only, window)
            if self.remat:
                call = nnx.remat(call)
            h = call(layer, h, masks[window], *ropes[types[i]])
        return self.norm(h)

    def decode(
        self, input_ids: jax.Array, positions: jax.Array, input_mask: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Final hidden states of ``input_ids [b, t]`` written into cache slots ``[length, length + t)``.

        ``positions [b, t]`` are the tokens' rotary positions; ``input_mask [b, t]`` is False for padding.
        Each query attends to the written slots up to its own (and within the sliding window) that hold real
        tokens, as transformers' generation with a cache does.
        """
        b, t = input_ids.shape
        cfg = self.config
        start = cache.length
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, input_mask.astype(jnp.bool_), start, 1)
        q_slot = start + jnp.arange(t)[:, None]
        k_slot = jnp.arange(cache.max_len)[None, :]
        masks = {}
        for w in set(map(cfg.window, range(len(self.layers)))):
            allowed = k_slot <= q_slot
            if w is not None:
                allowed = allowed & (k_slot > q_slot - w)
            masks[w] = allowed[None] & key_mask[:, None, :]
        h = self.embed_tokens(input_ids)
        types = cfg.attention_types
        ropes = {ty: rope_cos_sin(cfg, positions, h.dtype, ty) for ty in sorted(set(types))}
        keys, values = list(cache.keys), list(cache.values)
        for i, layer in enumerate(self.layers):
            mask = masks[cfg.window(i)]
            h, (keys[i], values[i]) = layer.cached(h, *ropes[types[i]], (keys[i], values[i]), start, mask)
        new = KVCache(tuple(keys), tuple(values), key_mask, start + t)
        return self.norm(h), new


class CausalLM(nnx.Module):
    """A causal LM of any family: ``model`` (``DecoderModel``) and ``lm_head`` (None when tied).

    Args:
      config: the architecture (``ModelConfig.from_hf(config_json)``).
      rngs: initializer randomness (normal(0, initializer_range) kernels and embeddings; norms at their
        identity: ones, or zeros for Gemma's ``1 + weight``).
      dtype: compute dtype (activations, matmul inputs); RMSNorm statistics and softmax stay float32.
      param_dtype: parameter dtype (e.g. float32 parameters with bfloat16 compute).
      embed_dtype: dtype of the embedding table (and so of a tied lm_head); default ``param_dtype``. Lookups
        cast only the rows they read; a tied head casts the table to the compute dtype once per call.
      remat: rematerialize each decoder layer in the backward pass (``nnx.remat``).

    Example:
      >>> cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      ...     num_attention_heads=2, num_key_value_heads=1, head_dim=8)
      >>> model = CausalLM(cfg, rngs=nnx.Rngs(0))
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
        embed_dtype=None,
        remat: bool = False,
    ):
        self.config = config
        embed_dtype = param_dtype if embed_dtype is None else embed_dtype
        self.model = DecoderModel(
            config, dtype=dtype, param_dtype=param_dtype, embed_dtype=embed_dtype, remat=remat, rngs=rngs
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else linear(config, config.hidden_size, config.vocab_size, False, dtype, param_dtype, rngs)
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
        return self.logits(self.model(input_ids, attention_mask, positions))

    def decode(
        self, input_ids: jax.Array, positions: jax.Array, input_mask: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Logits ``[b, t, vocab]`` of ``input_ids [b, t]`` continuing ``cache`` (``DecoderModel.decode``),
        and the cache with their keys and values written. ``oftjax.generate`` drives it."""
        hidden, cache = self.model.decode(input_ids, positions, input_mask, cache)
        return self.logits(hidden), cache

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """The final hidden states ``[batch, seq, hidden]`` (after the final norm) that ``logits`` maps to
        the vocabulary; arguments as ``__call__``."""
        return self.model(input_ids, attention_mask, positions)

    def matrix_head(self) -> tuple[jax.Array, float | None] | None:
        """``(table [vocab, hidden], softcap)`` when the output head is a plain matrix (the tied embedding
        table, or a float ``lm_head`` without bias or adapter), so that ``logits(h)`` is ``h @ table.T``
        (soft-capped when ``softcap`` is set); None for any other head (quantized or adapted ``lm_head``).
        The trainer computes such a head and the loss in chunks (``oftjax.train.head_loss_sum``)."""
        cap = self.config.final_logit_softcapping
        if self.lm_head is None:
            return self._tied_table(), cap
        if type(self.lm_head) is nnx.Linear and self.lm_head.bias is None:
            return self.lm_head.kernel[...].T, cap
        return None

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The output head on final hidden states ``[..., hidden]`` (``model``'s output): the tied table or
        ``lm_head``, then Gemma's soft-capping ``cap * tanh(logits / cap)``."""
        with jax.named_scope("gemm"):  # a profile label (benchmarks/profile_train.py), nothing else
            if self.lm_head is None:
                out = hidden @ self._tied_table().astype(hidden.dtype).T
            else:
                out = project(self.lm_head, hidden)
        cap = self.config.final_logit_softcapping
        return out if cap is None else soft_cap(out, cap)

    def _tied_table(self) -> jax.Array:
        """The tied head's table: the base embedding table (an OFT-adapted embedding rotates its lookups,
        not the tied head, as in PEFT)."""
        embed = self.model.embed_tokens
        return getattr(embed, "base_layer", embed).embedding[...]


def linear_modules(config: ModelConfig) -> list[tuple[str, bool]]:
    """``(module path, has bias)`` of every projection (what apply_oft and the bnb quantizer target), then
    ``lm_head`` when untied, in HF's order.

    Example:
      >>> cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
      ...     num_attention_heads=2, num_key_value_heads=2, head_dim=4, model_type="phi3")
      >>> [p.rsplit(".", 1)[-1] for p, _ in linear_modules(cfg)]
      ['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj', 'lm_head']
    """
    fused = config.family.fused_projections
    attn = (
        [("qkv_proj", config.qkv_bias)]
        if fused
        else [(n, config.qkv_bias) for n in ("q_proj", "k_proj", "v_proj")]
    )
    attn.append(("o_proj", config.o_bias))
    mlp = ["gate_up_proj", "down_proj"] if fused else ["gate_proj", "up_proj", "down_proj"]
    out = []
    for i in range(config.num_hidden_layers):
        out += [(f"model.layers.{i}.self_attn.{n}", bias) for n, bias in attn]
        out += [(f"model.layers.{i}.mlp.{n}", config.mlp_bias) for n in mlp]
    if not config.tie_word_embeddings:
        out.append(("lm_head", False))
    return out


def norm_modules(config: ModelConfig) -> list[str]:
    """Module paths of every RMSNorm (``weight`` only), the final ``model.norm`` last."""
    per_layer = ["input_layernorm", "post_attention_layernorm"]
    if config.family.sandwich_norms:
        per_layer += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    attn = ["self_attn.q_norm", "self_attn.k_norm"] if config.family.qk_norm else []
    paths = []
    for i in range(config.num_hidden_layers):
        paths += [f"model.layers.{i}.{n}" for n in attn + per_layer]
    return [*paths, "model.norm"]


LlamaForCausalLM = CausalLM
MistralForCausalLM = CausalLM
Qwen2ForCausalLM = CausalLM
Qwen3ForCausalLM = CausalLM
Gemma2ForCausalLM = CausalLM
Gemma3ForCausalLM = CausalLM
Phi3ForCausalLM = CausalLM
