"""Prefill and a jitted decode loop over a static-shape KV cache, for any ``oftjax.models.CausalLM``.

``generate`` left-pads the prompts to a length bucket (so a new prompt length within the bucket compiles
nothing), runs the prompt through the model once (prefill: writes the cache, samples the first token), then
decodes ``chunk`` tokens per jitted call inside a ``jax.lax.while_loop`` (one compilation per batch size and
cache length; the loop ends early when every row has stopped). Rotary positions count each row's real tokens
(left padding gets none), and padded slots are masked, as transformers' ``generate`` does with an attention
mask. OFT rotation blocks are built once per ``generate`` call, in prefill, and reused by every decode step
(``OFTAdapters.freeze_rotations``). The model runs in inference mode (``nnx.view(deterministic=True)``: no
module dropout; int8 layers use LLM.int8 as bitsandbytes does in eval).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oftjax.generate._sampling import SamplingConfig, sample_logits
from oftjax.models import KVCache, long_factor_length
from oftjax.nn import Linear8bit, OFTAdapters, find_modules, path_str

__all__ = ["GenerationResult", "generate", "prompt_bucket"]

Stream = Callable[[int, list[int]], None]


@dataclasses.dataclass
class GenerationResult:
    """What ``generate`` produced.

    Attributes:
      tokens: the new tokens of each prompt, up to and including a stop token (the eos is kept, as
        transformers' sequences keep it).
      texts: the new tokens decoded (special tokens skipped), when a tokenizer was given; else None.
      prompt_tokens: real (unpadded) prompt tokens per row.
      prefill_seconds: the first call's wall time, prompt to first token (includes compilation when new).
      decode_seconds: wall time of the remaining tokens.
      cache_bytes: memory of the KV cache.
    """

    tokens: list[list[int]]
    texts: list[str] | None
    prompt_tokens: list[int]
    prefill_seconds: float
    decode_seconds: float
    cache_bytes: int

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, all rows, per second of decoding."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def prompt_tokens_per_s(self) -> float:
        return sum(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")


def prompt_bucket(length: int, multiple: int = 64) -> int:
    """The padded prompt length for ``length`` tokens: the next multiple of ``multiple`` (>= ``multiple``)."""
    return max(multiple, -(-length // multiple) * multiple)


def _left_pad(prompts: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(prompts), length), pad, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, length - len(p) :] = p
            mask[i, length - len(p) :] = True
    return ids, mask


def _oft_layers(model: Any) -> list[tuple[str, OFTAdapters]]:
    return [(path_str(p), m) for p, m in find_modules(model, lambda m: isinstance(m, OFTAdapters))]


def _build_rotations(model: Any) -> dict[str, dict[str, jax.Array]]:
    return {
        p: {n: layer.rotation_blocks(n) for n in layer.forward_adapters()} for p, layer in _oft_layers(model)
    }


def _install_rotations(model: Any, rotations: dict[str, dict[str, jax.Array]]) -> None:
    from oftjax.nn._adapters import FrozenRotation

    for p, layer in _oft_layers(model):
        layer.frozen_rotations = nnx.Dict({n: FrozenRotation(R) for n, R in rotations[p].items()})


@functools.partial(jax.jit, static_argnums=(0, 7))
def _prefill(graphdef, state, ids, mask, positions, counted, cache, config: SamplingConfig, key):
    """The prompts' forward: the rotations, the first token, the cache. ``counted`` marks the rows that
    choose LLM.int8's outlier columns (every slot but the bucket's extra padding)."""
    model = nnx.merge(graphdef, state)
    rotations = _build_rotations(model)
    _install_rotations(model, rotations)
    for _, layer in find_modules(model, lambda m: isinstance(m, Linear8bit), enter=lambda m: True):
        layer.count_outliers_in(counted)
    hidden, cache = model.model.decode(ids, positions, mask, cache)
    logits = model.logits(hidden[:, -1])  # the head on the last position only: the others are not sampled
    first = sample_logits(logits, key, config)
    done = jnp.isin(first, jnp.asarray(config.eos_token_ids or (-1,), jnp.int32))
    return rotations, first, done, cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnames=("cache",))
def _decode_chunk(
    graphdef, config: SamplingConfig, chunk: int, state, rotations, cache, last, pos, done, key
):
    """Up to ``chunk`` decode steps: tokens ``[b, chunk]`` (pad where a row had stopped or the loop ended)."""
    model = nnx.merge(graphdef, state)
    _install_rotations(model, rotations)
    graphdef2, state2 = nnx.split(model)
    eos = jnp.asarray(config.eos_token_ids or (-1,), jnp.int32)
    b = last.shape[0]

    def step(carry):
        i, out, last, pos, done, cache, key = carry
        m = nnx.merge(graphdef2, state2)
        logits, cache = m.decode(last[:, None], pos[:, None], jnp.ones((b, 1), jnp.bool_), cache)
        key, sub = jax.random.split(key)
        nxt = sample_logits(logits[:, 0], sub, config)
        nxt = jnp.where(done, jnp.int32(config.pad_token_id), nxt)
        out = out.at[:, i].set(nxt)
        return i + 1, out, nxt, pos + 1, done | jnp.isin(nxt, eos), cache, key

    def more(carry):
        i, *_, done, _, _ = carry
        return (i < chunk) & ~jnp.all(done)

    out = jnp.full((b, chunk), config.pad_token_id, jnp.int32)
    carry = (jnp.int32(0), out, last, pos, done, cache, key)
    _, out, last, pos, done, cache, key = jax.lax.while_loop(more, step, carry)
    return out, last, pos, done, cache, key


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig | None = None,
    *,
    key: jax.Array | None = None,
    tokenizer: Any = None,
    stream: Stream | None = None,
    chunk: int = 16,
    bucket: int = 64,
    cache_dtype: Any = None,
) -> GenerationResult:
    """Generate continuations of token-id prompts with ``model`` (an ``oftjax.models.CausalLM``).

    Args:
      model: the model, with any active OFT adapters, over a float, int8 or 4-bit base. It runs in inference
        mode (module dropout off; int8 layers in LLM.int8 as bitsandbytes in eval); ``model`` is not changed.
      prompts: token ids per prompt (lengths may differ: left padding).
      config: max new tokens, greedy or sampling settings, stop tokens (default ``SamplingConfig()``).
      key: PRNG key for sampling (default ``jax.random.key(0)``); the same key gives the same tokens.
      tokenizer: anything with ``decode(ids, skip_special_tokens=...)`` (a ``tokenizers.Tokenizer``): fills
        ``texts``.
      stream: called as ``stream(row, new_tokens)`` after each decoded chunk with the tokens that arrived.
      chunk: decode steps per jitted call (the streaming granularity).
      bucket: prompts are left-padded to a multiple of this.
      cache_dtype: the KV cache's dtype (default: the model's compute dtype).

    Returns:
      A ``GenerationResult``.

    Example:
      >>> from flax import nnx
      >>> from oftjax.models import LlamaForCausalLM, ModelConfig
      >>> cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      ...     num_attention_heads=2, num_key_value_heads=1, head_dim=8)
      >>> out = generate(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), [[1, 2, 3], [4]], SamplingConfig(4))
      >>> [len(t) for t in out.tokens]
      [4, 4]
    """
    config = SamplingConfig() if config is None else config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each with at least one token")
    key = jax.random.key(0) if key is None else key
    options = _Options(stream, chunk, bucket, cache_dtype)
    first = _tokens_before_rope_switch(model.config, prompts, config)
    if first is None:
        result = _generate_once(model, prompts, config, key, options)
    else:
        result = _generate_across_rope_switch(model, prompts, config, key, options, first)
    if tokenizer is not None:
        result.texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    return result


@dataclasses.dataclass(frozen=True)
class _Options:
    stream: Stream | None
    chunk: int
    bucket: int
    cache_dtype: Any


def _generate_once(
    model: Any, prompts: Sequence[Sequence[int]], config: SamplingConfig, key: jax.Array, options: _Options
) -> GenerationResult:
    """Prefill, then decode chunks until every row stopped or ``max_new_tokens`` (texts left None)."""
    graphdef, state, ids, mask, positions, counted, cache = _prefill_inputs(model, prompts, config, options)
    cache_bytes = cache.nbytes

    t0 = time.perf_counter()
    key, sub = jax.random.split(key)
    rotations, last, done, cache = _prefill(
        graphdef, state, ids, mask, positions, counted, cache, config, sub
    )
    first = np.asarray(last)
    t1 = time.perf_counter()
    if options.stream is not None:
        for r, t in enumerate(first):
            options.stream(r, [int(t)])
    rows = [_until_stop([int(t)], config) for t in first]
    decoding = functools.partial(_decode_chunk, graphdef, config, options.chunk, state, rotations)
    carry = (cache, last, jnp.asarray(positions[:, -1] + 1), done, key)
    _decode_rows(decoding, carry, rows, config, options)
    t2 = time.perf_counter()
    return GenerationResult(rows, None, [len(p) for p in prompts], t1 - t0, t2 - t1, cache_bytes)


def _prefill_inputs(
    model: Any, prompts: Sequence[Sequence[int]], config: SamplingConfig, options: _Options
) -> tuple:
    """``_prefill``'s arguments before ``config`` and the key: the model split in inference mode, the
    left-padded prompts, their mask and positions, the rows that choose LLM.int8's outlier columns, and an
    empty cache with room for the bucket and every decode step."""
    view = nnx.view(model, deterministic=True, raise_if_not_found=False)
    graphdef, state = nnx.split(view)
    state = _tied_table_in_compute_dtype(model, state)
    longest = max(len(p) for p in prompts)
    length = prompt_bucket(longest, options.bucket)
    ids, mask = _left_pad(prompts, length, config.pad_token_id)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    # transformers pads a batch to its longest prompt, and LLM.int8's outlier columns see those rows: so do
    # ours, but not the rows the bucket adds (a prompt alone then runs as it does alone in transformers)
    counted = np.broadcast_to(np.arange(length) >= length - longest, ids.shape)
    steps = -(-max(config.max_new_tokens - 1, 1) // options.chunk) * options.chunk
    dtype = options.cache_dtype or _compute_dtype(model)
    cache = KVCache.create(model.config, batch=len(prompts), max_len=length + steps, dtype=dtype)
    return graphdef, state, ids, mask, positions, counted, cache


def _decode_rows(decoding: Callable, carry: tuple, rows: list[list[int]], config, options: _Options) -> None:
    """Run ``decoding`` (``_decode_chunk`` bound to the model) chunk by chunk, extending ``rows`` in place
    with each row's tokens up to its stop token, until every row stopped or ``max_new_tokens`` are made."""
    cache, last, pos, done, key = carry
    finished = np.asarray(done)
    produced = 1  # tokens per row so far, stopped rows included (all rows advance together)
    while produced < config.max_new_tokens and not finished.all():
        out, last, pos, done, cache, key = decoding(cache, last, pos, done, key)
        produced += options.chunk
        arrived, finished_before, finished = np.asarray(out), finished, np.asarray(done)
        for r in range(len(rows)):
            if finished_before[r]:
                continue
            new = _until_stop(arrived[r, : config.max_new_tokens - len(rows[r])].tolist(), config)
            rows[r].extend(new)
            if options.stream is not None and new:
                options.stream(r, new)


def _tokens_before_rope_switch(
    model_config: Any, prompts: Sequence[Sequence[int]], config: SamplingConfig
) -> int | None:
    """How many new tokens come before the sequence reaches LongRoPE's switch to its long factors
    (``oftjax.models.long_factor_length``), when that happens during this generation; else None."""
    types = set(getattr(model_config, "attention_types", ("full_attention",)))
    switches = [s for t in sorted(types) if (s := long_factor_length(model_config, t)) is not None]
    if not switches:
        return None
    first = min(switches) - max(len(p) for p in prompts)
    return first if 0 < first < config.max_new_tokens else None


def _generate_across_rope_switch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    key: jax.Array,
    options: _Options,
    first: int,
) -> GenerationResult:
    """Generation that crosses LongRoPE's switch, as transformers runs it (docs/generation.md, "LongRoPE").

    The keys and values cached before the switch were rotated by the short factors, and every layer above saw
    them; from the switch on, the model rotates every position by the long factors. transformers' Phi-3
    drops its cache there and runs the whole sequence again; so do we: ``first`` tokens from the prompts,
    then a second prefill over the prompts and those tokens (rows stopped by a stop token continue with pad
    tokens, as transformers feeds them), then the rest.
    """
    key_head, key_tail = jax.random.split(key)
    head = _generate_once(
        model, prompts, dataclasses.replace(config, max_new_tokens=first), key_head, options
    )
    stopped = [bool(h) and h[-1] in config.eos_token_ids for h in head.tokens]
    longer = [
        [*p, *h, *[config.pad_token_id] * (first - len(h))] for p, h in zip(prompts, head.tokens, strict=True)
    ]

    def stream(row: int, tokens: list[int]) -> None:
        if not stopped[row]:
            options.stream(row, tokens)

    rest = dataclasses.replace(config, max_new_tokens=config.max_new_tokens - first)
    tail_options = dataclasses.replace(options, stream=None if options.stream is None else stream)
    tail = _generate_once(model, longer, rest, key_tail, tail_options)
    tokens = [h if s else h + t for h, t, s in zip(head.tokens, tail.tokens, stopped, strict=True)]
    return GenerationResult(
        tokens,
        None,
        head.prompt_tokens,
        head.prefill_seconds,
        head.decode_seconds + tail.prefill_seconds + tail.decode_seconds,
        max(head.cache_bytes, tail.cache_bytes),
    )


def _until_stop(row: list[int], config: SamplingConfig) -> list[int]:
    for i, t in enumerate(row):
        if t in config.eos_token_ids:
            return row[: i + 1]
    return row[: config.max_new_tokens]


def _tied_table_in_compute_dtype(model: Any, state: nnx.State) -> nnx.State:
    """``state`` with a tied output head's table cast to the compute dtype, once per call.

    A checkpoint's bfloat16 table stays bfloat16 in a float32 model (half the memory); the head multiplies in
    the compute dtype, so every jitted call would convert the whole table again (XLA hoists it out of the
    decode loop, not out of the call). Lookups read the same values from either table (they cast the rows
    they read). The model's own table is not touched: the cast table lives for this call only.
    """
    if model.lm_head is not None:
        return state
    embed = model.model.embed_tokens
    base = getattr(embed, "base_layer", embed)
    dtype = _compute_dtype(model)
    if base.embedding[...].dtype == dtype:
        return state
    want = ("model", "embed_tokens", *(("base_layer",) if base is not embed else ()), "embedding")

    def cast(path: tuple, leaf: Any) -> Any:
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return leaf.astype(dtype) if names[: len(want)] == want else leaf

    return jax.tree_util.tree_map_with_path(cast, state)


def _compute_dtype(model: Any) -> Any:
    embed = model.model.embed_tokens
    return getattr(embed, "base_layer", embed).dtype or jnp.float32
