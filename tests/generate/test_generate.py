"""oftjax.generate: cached decoding equals recomputing the whole sequence, sampling is reproducible and
draws from the right distribution, and a new prompt length within a bucket compiles nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oftjax
from oftjax.generate import SamplingConfig, _decode, generate, sample_logits
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.train import quantize_model
from tests._tiny import TINY_LLAMA

pytestmark = pytest.mark.usefixtures("kernels")

PROMPTS = [[5, 17, 3, 99, 4, 8, 15], [42], [7, 7, 7, 1, 2]]


def _model(quant: str = "none", oft: bool = True) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf({**TINY_LLAMA, "model_type": "llama", "head_dim": 16})
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    quantize_model(model, quant)
    if oft:
        targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
        oft_cfg = oftjax.OFTConfig(r=0, oft_block_size=16, target_modules=targets, init_weights=False)
        oftjax.apply_oft(model, oft_cfg, rngs=nnx.Rngs(1))
    return model


def _greedy_reference(model, prompt, n, eos=()):
    """Greedy decoding by running the whole sequence through the model for every new token (no cache).

    The sequence is right-padded to one length (causal attention: later tokens do not change earlier
    logits), so the jitted forward compiles once.
    """
    view = nnx.view(model, deterministic=True, raise_if_not_found=False)
    graphdef, state = nnx.split(view)
    forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    ids = np.zeros((1, len(prompt) + n), np.int32)
    ids[0, : len(prompt)] = prompt
    out = []
    for i in range(len(prompt), len(prompt) + n):
        logits = forward(state, jnp.asarray(ids))
        t = int(jnp.argmax(logits[0, i - 1].astype(jnp.float32)))
        out.append(t)
        if i < ids.shape[1]:
            ids[0, i] = t
        if t in eos:
            break
    return out


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_cached_greedy_decoding_equals_recomputing_the_sequence(quant):
    model = _model(quant)
    result = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10), chunk=4, bucket=16)
    for prompt, tokens in zip(PROMPTS, result.tokens, strict=True):
        assert tokens == _greedy_reference(model, prompt, 10)
    assert result.prompt_tokens == [len(p) for p in PROMPTS]
    assert result.cache_bytes > 0


def test_int8_bucket_padding_does_not_choose_outlier_columns():
    """LLM.int8 picks outlier columns from every row it is given: the bucket's padding must not count, so a
    prompt padded to its bucket computes what it computes unpadded (transformers runs it unpadded). Compared:
    the keys and values prefill writes for the prompt's tokens, and the tokens."""
    model = _model("int8")
    # the pad token's embedding, normalized, is 8 in column 3: an outlier in every padding row
    table = model.model.embed_tokens.embedding
    table[...] = table[...].at[0].set(jnp.zeros(64).at[3].set(1.0))
    prompt, config = PROMPTS[0], SamplingConfig(max_new_tokens=8)

    def prefill_cache(bucket: int, count_padding: bool = False):
        options = _decode._Options(None, 16, bucket, None)
        args = list(_decode._prefill_inputs(model, [prompt], config, options))
        if count_padding:
            args[5] = np.ones_like(args[5])
        cache = _decode._prefill(*args, config, jax.random.key(0))[3]
        n = len(prompt)
        start = args[2].shape[1] - n
        return np.stack([np.asarray(k[:, start : start + n]) for k in cache.keys + cache.values])

    alone, padded = prefill_cache(1), prefill_cache(64)
    np.testing.assert_array_equal(padded, alone)
    # the bucket's padding, counted, changes the prompt's own keys and values: the test can fail
    assert np.abs(prefill_cache(64, count_padding=True) - alone).max() > 1e-4 * np.abs(alone).max()
    tokens = {bucket: generate(model, [prompt], config, bucket=bucket).tokens for bucket in (1, 64)}
    assert tokens[1] == tokens[64]


def test_a_bfloat16_tied_table_is_converted_once_per_call_and_gives_the_same_tokens():
    """A bf16 tied table in a float32 model: generate casts it once for the call (its jitted calls see a
    float32 table), the model keeps its bf16 table, and the tokens equal recomputing with the bf16 table."""
    hf = {**TINY_LLAMA, "model_type": "llama", "head_dim": 16, "tie_word_embeddings": True}
    cfg = ModelConfig.from_hf(hf)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), embed_dtype=jnp.bfloat16)
    _, state = nnx.split(model)
    cast = _decode._tied_table_in_compute_dtype(model, state)
    assert cast["model"]["embed_tokens"]["embedding"][...].dtype == jnp.float32
    assert model.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    leaves = jax.tree_util.tree_leaves_with_path(cast)
    others = [a for p, a in leaves if "embed_tokens" not in jax.tree_util.keystr(p)]
    assert others and all(a.dtype == jnp.float32 for a in others)
    result = generate(model, PROMPTS, SamplingConfig(max_new_tokens=6), chunk=4, bucket=16)
    for prompt, tokens in zip(PROMPTS, result.tokens, strict=True):
        assert tokens == _greedy_reference(model, prompt, 6)


def test_rows_stop_at_their_eos_and_stream_what_they_keep():
    model = _model()
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8), bucket=16).tokens
    eos = free[0][2]  # a token row 0 emits third: it must stop there
    streamed: dict[int, list[int]] = {}
    result = generate(
        model,
        PROMPTS,
        SamplingConfig(max_new_tokens=8, eos_token_ids=(eos,)),
        bucket=16,
        chunk=2,
        stream=lambda r, new: streamed.setdefault(r, []).extend(new),
    )
    assert result.tokens[0] == free[0][:3]
    for r, tokens in enumerate(result.tokens):
        assert tokens == _greedy_reference(model, PROMPTS[r], 8, eos=(eos,))
        assert streamed[r] == tokens


def test_sampling_is_reproducible_by_key():
    model = _model()
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.3, top_k=40, top_p=0.95)
    a = generate(model, PROMPTS, cfg, key=jax.random.key(3), bucket=16).tokens
    b = generate(model, PROMPTS, cfg, key=jax.random.key(3), bucket=16).tokens
    c = generate(model, PROMPTS, cfg, key=jax.random.key(4), bucket=16).tokens
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=0.8),
        SamplingConfig(temperature=1.0, top_k=3),
        SamplingConfig(temperature=1.0, top_p=0.7),
        SamplingConfig(temperature=0.5, top_k=4, top_p=0.9),
    ],
    ids=["temperature", "top-k", "top-p", "all"],
)
def test_sampled_tokens_follow_the_renormalized_distribution(cfg):
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.7]])
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, cfg)[0]))(keys))
    # expected: temperature, then the k most likely, then the smallest set reaching top_p, renormalized
    p = np.asarray(jax.nn.softmax(logits[0] / cfg.temperature), np.float64)
    keep = np.ones_like(p, bool)
    order = np.argsort(-p)
    if cfg.top_k:
        keep[order[cfg.top_k :]] = False
    if cfg.top_p < 1.0:
        q = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
        before = np.cumsum(q[order]) - q[order]
        keep[order[before >= cfg.top_p]] = False
    expected = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
    counts = np.bincount(draws, minlength=p.size)
    assert counts[~keep].sum() == 0
    chi2 = float(((counts[keep] - n * expected[keep]) ** 2 / (n * expected[keep])).sum())
    # chi-square with (kept - 1) degrees of freedom: the 99.9% quantile is below 3 * dof + 12 for dof <= 7
    assert chi2 < 3 * (keep.sum() - 1) + 12, (chi2, counts, expected)


def test_a_new_prompt_length_within_the_bucket_compiles_nothing():
    model = _model()
    cfg = SamplingConfig(max_new_tokens=6)
    generate(model, [[1, 2, 3]], cfg, bucket=16)
    before = (_decode._prefill._cache_size(), _decode._decode_chunk._cache_size())
    generate(model, [[4, 5, 6, 7, 8, 9, 10, 11, 12]], cfg, bucket=16)
    generate(model, [list(range(1, 17))], cfg, bucket=16)
    assert (_decode._prefill._cache_size(), _decode._decode_chunk._cache_size()) == before


def test_rotation_blocks_are_built_once_per_call_not_per_token(monkeypatch):
    from oftjax.nn import _adapters

    model = _model()
    layers = len(list(oftjax.oft_layers(model)))
    built = []
    real = _adapters.rotation_from_vec
    monkeypatch.setattr(_adapters, "rotation_from_vec", lambda v, s: built.append(1) or real(v, s))
    jax.clear_caches()  # trace again, counting
    generate(model, PROMPTS, SamplingConfig(max_new_tokens=9), chunk=2, bucket=16)  # 4 decode chunks
    assert len(built) == layers  # in prefill's trace only; every decode step reads the frozen blocks


def test_prompts_must_have_tokens():
    with pytest.raises(ValueError, match="at least one token"):
        generate(_model(), [[1], []])
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
