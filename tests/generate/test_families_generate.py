"""Greedy generation of every family at small widths: cached == recomputed == transformers' ``generate``.

The models are tests/parity/test_families_small_parity.py's (every parameter drawn, each family's options
binding): Qwen3 with a windowed second layer, Gemma 2 with soft caps and ``query_pre_attn_scalar``, Gemma 3
with local and global ropes, Phi-3 with LongRoPE switching to its long factors at 9 tokens. Prompts of
different lengths share a batch (left padding; ours pads further, to a bucket) and the generated length
passes every sliding window. For each family and variant (float; NF4 with double quantization, loaded from
the bitsandbytes checkpoint transformers writes; a PEFT OFT adapter on the NF4 base), ``oftjax.generate``
with its KV cache gives the tokens of greedy decoding by our own forward over the whole sequence at each
step, and the tokens of transformers' ``generate(do_sample=False)`` on the same checkpoint (+ PEFT).

A divergence is allowed only after a near tie: a step where the reference's two largest logits are within
``TOL["greedy_near_tie"]``; it is reported as a warning.

LongRoPE during generation: transformers decides short or long factors from the largest position of each
forward, and ``Phi3ForCausalLM.prepare_inputs_for_generation`` drops the cache when the sequence first
reaches ``original_max_position_embeddings + 1`` tokens, recomputing every key and value with the long
factors; the tokens are those of recomputing the whole sequence. Prompts already past the switch are the
main cases here; prompts that cross it while generating are tested on their own.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from interop import oracle
from interop.hf_model import load_model
from interop.peft import load_adapter
from oftjax.generate import SamplingConfig, generate
from oftjax.models._rope import long_factor_length
from tests.parity._family_helpers import targets
from tests.parity.test_families_small_parity import BASE, SMALL
from tests.tolerances import TOL

NEW = 10  # new tokens: every sequence passes the windows (4 and 5)
LENGTHS = (6, 2, 5)  # prompt lengths in one batch (left padding)
PAST_SWITCH = (11, 3, 9)  # Phi-3: the longest prompt is past LongRoPE's switch at 9 tokens already
BUCKET = 8  # ours pads prompts to a multiple of 8: more left padding than transformers' (the longest prompt)


class NearTie(UserWarning):
    """Greedy decoding went another way after a step whose two best logits were within the near-tie bound."""


@dataclasses.dataclass
class Checkpoints:
    """One family's directories: ``float``, ``nf4`` (bnb NF4 + double quantization), ``oft`` (a PEFT adapter
    whose every rotation is drawn)."""

    model_type: str
    float: Path
    nf4: Path
    oft: Path

    def ours(self, variant: str) -> Any:
        model = load_model(self.float if variant == "float" else self.nf4)
        if variant.endswith("-oft"):
            assert load_adapter(model, self.oft)
        return model

    def theirs(self, variant: str) -> Any:
        base = self.float if variant == "float" else self.nf4
        adapter = self.oft if variant.endswith("-oft") else None
        model = oracle.load_causal_lm(base, adapter=adapter)
        # no eos: every row generates NEW tokens (ours has none either)
        (model.get_base_model() if adapter else model).generation_config.eos_token_id = None
        return model.eval()


def _checkpoints(model_type: str, root: Path) -> Checkpoints:
    cfg = transformers.AutoConfig.for_model(model_type, **{**BASE, **SMALL[model_type]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as test_families_small_parity: every parameter drawn
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.05, generator=g)
            if "norm" in name and not model_type.startswith("gemma"):
                p.add_(1.0)
    model.save_pretrained(root / "float")
    quantized = oracle.load_causal_lm(root / "float", quant="nf4", double_quant=True)
    quantized.save_pretrained(root / "nf4")
    block = 12 if model_type == "gemma3_text" else 16
    cfg = peft.OFTConfig(r=0, oft_block_size=block, target_modules=targets(model_type), task_type="CAUSAL_LM")
    adapted = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "oft_" in name:
                p.normal_(0.0, 0.1, generator=g)
    adapted.save_pretrained(root / "oft")
    return Checkpoints(model_type, root / "float", root / "nf4", root / "oft")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model_type -> Checkpoints, built on first use."""
    built: dict[str, Checkpoints] = {}

    def get(model_type: str) -> Checkpoints:
        if model_type not in built:
            built[model_type] = _checkpoints(model_type, tmp_path_factory.mktemp(model_type))
        return built[model_type]

    return get


def _prompts(lengths: tuple[int, ...], seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, BASE["vocab_size"], n).tolist() for n in lengths]


def _left_padded(prompts: list[list[int]], total: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask ``[b, total]``: each prompt right-aligned at the longest prompt's end."""
    p = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), total), np.int64), np.zeros((len(prompts), total), bool)
    for r, q in enumerate(prompts):
        ids[r, p - len(q) : p], mask[r, p - len(q) : p] = q, True
    return ids, mask


def hf_greedy(model: Any, prompts: list[list[int]], new: int) -> tuple[list[list[int]], np.ndarray]:
    """transformers' ``generate(do_sample=False)`` on the left-padded batch: tokens and logits
    ``[b, new, vocab]``."""
    p = max(map(len, prompts))
    ids, mask = _left_padded(prompts, p)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=new,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return out.sequences[:, p:].tolist(), torch.stack(out.logits, 1).float().numpy()


def recomputed_greedy(model: Any, prompts: list[list[int]], new: int) -> tuple[list[list[int]], np.ndarray]:
    """Greedy decoding by our forward over the whole left-padded batch at every step (no cache): tokens and
    logits ``[b, new, vocab]``.

    The batch has its final length from the start (one compilation): slots not generated yet are masked and
    sit at position 0, so neither attention (causal) nor LongRoPE's choice (the largest position) sees them.
    Positions count each row's real tokens, as transformers' ``generate`` numbers them.
    """
    graphdef, state = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))
    forward = jax.jit(lambda st, i, m, q: nnx.merge(graphdef, st)(i, m, q))
    p = max(map(len, prompts))
    ids, mask = _left_padded(prompts, p + new)
    tokens, logits = [], []
    for cur in range(p, p + new):
        positions = np.where(mask, np.cumsum(mask, 1) - 1, 0)
        out = forward(state, *(jnp.asarray(a, jnp.int32) for a in (ids, mask, positions)))
        step = np.asarray(out[:, cur - 1], np.float32)
        ids[:, cur], mask[:, cur] = step.argmax(-1), True
        tokens.append(step.argmax(-1))
        logits.append(step)
    return np.stack(tokens, 1).tolist(), np.stack(logits, 1)


def assert_same_tokens(
    got: list[list[int]],
    want: list[list[int]],
    want_logits: np.ndarray,
    what: str,
    tie: str = "greedy_near_tie",
) -> None:
    """Row by row ``got == want``, or equal up to a step where the reference (``want_logits [b, steps,
    vocab]``) had a near tie (top-2 gap <= ``TOL[tie]``: atol + rtol * |top logit|): that divergence is
    reported (``NearTie``), any other fails."""
    tol = TOL[tie]
    for r, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(g) == len(w), (what, r, g, w)
        if g == w:
            continue
        j = next(i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b)
        top2 = np.sort(want_logits[r, j].astype(np.float64))[-2:]
        gap, bound = float(top2[1] - top2[0]), tol.atol + tol.rtol * abs(float(top2[1]))
        assert gap <= bound, f"{what}, row {r}: {g} != {w} from step {j}, the reference's top-2 gap {gap:.3e}"
        warnings.warn(
            f"{what}, row {r}: diverged at step {j} after a near tie (gap {gap:.2e})", NearTie, stacklevel=2
        )


CASES = [
    *[(model_type, "float", "pure_jax") for model_type in SMALL],
    # QOFT as `oftjax generate` runs it on a CPU: Phi-3's fused projections, the CPU kernels on
    ("phi3", "nf4-oft", "cpu_kernels"),
    *[
        pytest.param(model_type, variant, "pure_jax", marks=pytest.mark.slow)
        for model_type in SMALL
        for variant in ("nf4", "nf4-oft")
    ],
]


@pytest.mark.parametrize(("model_type", "variant", "kernels"), CASES, indirect=["kernels"])
def test_cached_greedy_equals_recomputing_and_transformers(checkpoints, model_type, variant, kernels):
    ckpt = checkpoints(model_type)
    prompts = _prompts(PAST_SWITCH if model_type == "phi3" else LENGTHS)
    ours = ckpt.ours(variant)
    assert max(map(len, prompts)) + NEW > max(filter(None, map(ours.config.window, range(2))))
    cached = generate(ours, prompts, SamplingConfig(max_new_tokens=NEW), bucket=BUCKET, chunk=4).tokens
    recomputed, recomputed_logits = recomputed_greedy(ours, prompts, NEW)
    assert_same_tokens(cached, recomputed, recomputed_logits, f"{model_type} {variant}: cached vs recomputed")
    theirs, their_logits = hf_greedy(ckpt.theirs(variant), prompts, NEW)
    assert_same_tokens(cached, theirs, their_logits, f"{model_type} {variant}: oftjax vs transformers")


@pytest.fixture(scope="module")
def crossing(checkpoints):
    """Phi-3 (float) with prompts shorter than LongRoPE's switch that cross it while generating: our model,
    the prompts, the recomputed and transformers' greedy tokens (and logits)."""
    ckpt = checkpoints("phi3")
    ours, prompts = ckpt.ours("float"), _prompts(LENGTHS)
    switch = long_factor_length(ours.config)
    assert max(map(len, prompts)) < switch <= max(map(len, prompts)) + NEW
    return ours, prompts, recomputed_greedy(ours, prompts, NEW), hf_greedy(ckpt.theirs("float"), prompts, NEW)


def test_longrope_crossing_the_switch_in_one_generate_call(crossing):
    """One ``generate`` call rebuilds its cache at the switch itself (docs/generation.md, "LongRoPE")."""
    ours, prompts, (recomputed, recomputed_logits), (theirs, their_logits) = crossing
    tokens = generate(ours, prompts, SamplingConfig(max_new_tokens=NEW), bucket=BUCKET, chunk=4).tokens
    assert_same_tokens(tokens, recomputed, recomputed_logits, "phi3 crossing, one call: cached vs recomputed")
    assert_same_tokens(tokens, theirs, their_logits, "phi3 crossing, one call: oftjax vs transformers")


def test_longrope_crossing_with_a_row_stopped_before_the_switch(checkpoints, crossing):
    """A row that stops before the switch still counts in the rebuilt prefill (transformers feeds it pad
    tokens, and the longest row decides the factors); what is streamed is what is returned."""
    ours, prompts, _, (free, _) = crossing
    stop = free[1][1]  # the second token of the shortest prompt's row: it stops before the switch
    streamed: dict[int, list[int]] = {}
    config = SamplingConfig(max_new_tokens=NEW, eos_token_ids=(stop,))
    result = generate(
        ours,
        prompts,
        config,
        bucket=BUCKET,
        chunk=4,
        stream=lambda r, new: streamed.setdefault(r, []).extend(new),
    )
    theirs = checkpoints("phi3").theirs("float")
    theirs.generation_config.eos_token_id = stop
    want, logits = hf_greedy(theirs, prompts, NEW)  # rows padded with 0 after their stop token
    assert stop in want[1][: long_factor_length(ours.config) - max(map(len, prompts))]
    padded = [t + [0] * (len(w) - len(t)) for t, w in zip(result.tokens, want, strict=True)]
    assert_same_tokens(padded, want, logits, "phi3 crossing with a stop token: oftjax vs transformers")
    assert streamed == dict(enumerate(result.tokens))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gemma3_bfloat16_greedy(checkpoints, seed):
    """Gemma 3 in bfloat16, where its embedding scale sqrt(48) rounds to 6.9375 (transformers rounds it to the
    weight dtype): cached vs recomputed and vs transformers (eager attention, what ours computes) in bfloat16.
    bfloat16 logits tie far more often than float32 ones: near ties are counted in bfloat16 steps."""
    ckpt = checkpoints("gemma3_text")
    prompts = _prompts(LENGTHS, seed=seed)
    ours = load_model(ckpt.float, dtype="bfloat16")
    assert ours.model.embed_tokens.dtype == jnp.bfloat16
    cached = generate(ours, prompts, SamplingConfig(max_new_tokens=NEW), bucket=BUCKET, chunk=4).tokens
    recomputed, recomputed_logits = recomputed_greedy(ours, prompts, NEW)
    tie = "greedy_near_tie_bf16"
    assert_same_tokens(cached, recomputed, recomputed_logits, "gemma3 bf16: cached vs recomputed", tie)
    theirs = oracle.load_causal_lm(ckpt.float, dtype="bfloat16", attn_implementation="eager").eval()
    theirs.generation_config.eos_token_id = None
    tokens, logits = hf_greedy(theirs, prompts, NEW)
    assert_same_tokens(cached, tokens, logits, "gemma3 bf16: oftjax vs transformers", tie)
