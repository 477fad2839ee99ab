"""Greedy generation on the real SmolLM2 against transformers' ``generate`` (+ PEFT, + bitsandbytes NF4).

Eight real questions, each rendered with the checkpoint's chat template and the generation prompt (the same
ids on both sides: transformers' ``apply_chat_template`` and ``oftjax.chat_data.ChatTokenizer`` are checked
to agree), 32 new tokens each, float32, for: the float base; the float base with a trained adapter; NF4
(+ double quantization: bitsandbytes quantizes the float checkpoint on load and saves it, and oftjax loads
that bnb checkpoint); NF4 with the adapter. transformers runs ``generate(do_sample=False,
max_new_tokens=32)`` one prompt at a time (no padding) with eager attention (the computation oftjax's
attention reproduces: interop/oracle.py); oftjax decodes the eight prompts as one left-padded batch
(``oftjax.generate.generate``: per-row positions and masks), with the CPU kernels on (as ``oftjax generate``
runs on a CPU) and, for NF4 + adapter, also with the pure-JAX default. Both run the full 32 tokens: no stop
at the eos token, so that every position is compared.

The tokens must be identical, except after a near tie: the step where the two sides first differ must be one
where the two largest of transformers' logits are within ``TOL["greedy_near_tie"]`` of each other (its logits
are recorded at every step); the divergences and all near ties are printed. The adapter is trained for a few
steps with PEFT in torch on the packaged chat set and saved; both sides load the same files, and it changes
the generated tokens.

The default suite runs the real checkpoint cut to its first two decoder layers (real weights, tokenizer and
vocabulary); the whole 30-layer model runs under ``-m slow``. 8-bit (LLM.int8) generation:
tests/parity/test_int8_generate_parity.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
from pathlib import Path

import numpy as np
import pytest

from interop import oracle
from tests._real_model import smollm2_dir  # noqa: F401 - the session fixture
from tests.parity.test_real_model_cli import smollm2_2layers  # noqa: F401 - the two-layer cut
from tests.tolerances import TOL

QUESTIONS = (
    "What causes the seasons on Earth?",
    "Explain the difference between a list and a tuple in Python.",
    "Write a short poem about autumn leaves.",
    "How do vaccines teach the immune system to fight a disease?",
    "Give me three tips for writing a clear email.",
    "What is the Pythagorean theorem and what is it used for?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why do we need sleep?",
)
NEW_TOKENS = 32
VARIANTS = ("float", "float+adapter", "nf4", "nf4+adapter")
ADAPTER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------ prompts and data


def chat_prompts(model_dir: Path, questions=QUESTIONS) -> list[list[int]]:
    """Each question as a user turn with the generation prompt: transformers' ids, checked equal to ours."""
    transformers = oracle.require("transformers")
    from oftjax.chat_data import ChatTokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    chat = ChatTokenizer.from_checkpoint(model_dir)
    prompts = []
    for question in questions:
        messages = [{"role": "user", "content": question}]
        theirs = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
        text, _ = chat.template.render(messages, add_generation_prompt=True)
        ours = chat.tokenizer.encode(text, add_special_tokens=False).ids
        assert ours == theirs, f"chat prompt ids differ for {question!r}"
        prompts.append(theirs)
    return prompts


def train_peft_adapter(model_dir: Path, out: Path, *, steps: int = 4, lr: float = 1e-3) -> Path:
    """A PEFT OFT adapter on every projection, trained ``steps`` AdamW steps in torch on the first rows of the
    packaged chat set, saved to ``out``."""
    torch = oracle.require("torch")
    peft = oracle.require("peft")
    transformers = oracle.require("transformers")
    from oftjax.chat_data import pydoc_chat_paths

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    lines = pydoc_chat_paths()["train"].read_text().splitlines()[:2]
    rows = [
        tokenizer.apply_chat_template(json.loads(line)["messages"], return_dict=False)[:96] for line in lines
    ]
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (96 - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (96 - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    model = oracle.load_causal_lm(model_dir, attn_implementation="eager")
    config = peft.OFTConfig(r=0, oft_block_size=32, target_modules=ADAPTER_TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(out)
    del model, opt
    gc.collect()
    return out


def quantized_checkpoint(model_dir: Path, quant: str, out: Path) -> Path:
    """``model_dir`` quantized by transformers + bitsandbytes on load (``quant``: "nf4" with double
    quantization, or "int8") and saved before any forward (docs/oracle.md)."""
    model = oracle.load_causal_lm(model_dir, quant=quant)
    model.save_pretrained(out)
    del model
    gc.collect()
    return out


class Checkpoints:
    """The directories both sides load, each made on first use under ``root``: the float checkpoint, its NF4
    (+ double quantization) and int8 copies (``quantized_checkpoint``), and the trained PEFT adapter."""

    def __init__(self, float_dir: Path, root: Path):
        self.dirs = {"float": float_dir}
        self.root = root

    def __getitem__(self, kind: str) -> Path:
        if kind not in self.dirs:
            out = self.root / kind
            if kind == "adapter":
                self.dirs[kind] = train_peft_adapter(self.dirs["float"], out)
            else:
                self.dirs[kind] = quantized_checkpoint(self.dirs["float"], kind, out)
        return self.dirs[kind]

    def of(self, variant: str) -> tuple[Path, Path | None]:
        """``(checkpoint, adapter or None)`` of a variant such as "nf4+adapter"."""
        base, _, adapter = variant.partition("+")
        return self[base], (self["adapter"] if adapter else None)


# --------------------------------------------------------------------------------------- the two generators


@contextlib.contextmanager
def torch_threads(n: int):
    """torch with ``n`` threads inside: a decode step is a few small matrix-vector products, for which
    OpenMP threads waiting on a busy machine cost far more than they gain."""
    torch = oracle.require("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_greedy(
    model, prompts: list[list[int]], new_tokens: int
) -> tuple[list[list[int]], list[np.ndarray]]:
    """transformers' greedy ``generate``, one prompt at a time, no eos stop (``model``'s generation config
    loses its eos id): the new tokens of each prompt and the logits of every step (float32
    ``[new_tokens, vocab]``)."""
    torch = oracle.require("torch")
    transformers = oracle.require("transformers")
    config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.generation_config.eos_token_id = None  # generate falls back to the model's own for a None above
    tokens, logits = [], []
    with torch_threads(1), torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            tokens.append(out.sequences[0, len(prompt) :].tolist())
            logits.append(torch.cat(out.logits).float().numpy())
    return tokens, logits


def load_ours(checkpoint: Path, adapter: Path | None):
    from interop.hf_model import load_model
    from interop.peft import load_adapter

    model = load_model(checkpoint, dtype="float32")
    if adapter is not None:
        load_adapter(model, adapter)
    return model


def ours_greedy(model, prompts: list[list[int]], new_tokens: int, *, alone: bool = False) -> list[list[int]]:
    """oftjax's greedy ``generate``, no eos stop: all prompts as one left-padded batch, or (``alone``) each
    prompt by itself, left-padded to its bucket as ``generate`` does by default (transformers runs it
    unpadded)."""
    from oftjax.generate import SamplingConfig, generate

    config = SamplingConfig(max_new_tokens=new_tokens)
    if alone:
        tokens = [generate(model, [p], config).tokens[0] for p in prompts]
    else:
        tokens = generate(model, prompts, config).tokens
    assert [len(t) for t in tokens] == [new_tokens] * len(prompts)
    return tokens


def load_torch(checkpoint: Path, adapter: Path | None):
    """transformers (+ bitsandbytes from the checkpoint's own config, + PEFT) in eval mode: 8-bit layers in
    LLM.int8, as transformers generates."""
    return oracle.load_causal_lm(checkpoint, adapter=adapter, attn_implementation="eager", int8_mode="eval")


# ------------------------------------------------------------------------------------------- the comparison


def top2_gaps(logits: np.ndarray) -> np.ndarray:
    """The largest logit minus the second largest, per step."""
    top = np.sort(logits, axis=-1)[:, -2:]
    return top[:, 1] - top[:, 0]


@dataclasses.dataclass
class PromptComparison:
    """One prompt's greedy tokens on both sides: where they first differ (None: identical), and the steps
    where transformers' two best logits were within the near-tie bound."""

    ours: list[int]
    theirs: list[int]
    gaps: np.ndarray
    first_difference: int | None
    near_ties: list[int]

    @property
    def allowed(self) -> bool:
        """Identical, or first different at a near tie (the later tokens then follow other prefixes)."""
        return self.first_difference is None or self.first_difference in self.near_ties


def compare_greedy(ours, theirs, logits, near_tie: float) -> list[PromptComparison]:
    rows = []
    for a, b, step_logits in zip(ours, theirs, logits, strict=True):
        assert len(a) == len(b) == len(step_logits), (len(a), len(b), len(step_logits))
        gaps = top2_gaps(step_logits)
        assert [int(t) for t in step_logits.argmax(-1)] == b  # the recorded logits are the greedy choice
        differ = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        first = differ[0] if differ else None
        ties = [int(i) for i in np.flatnonzero(gaps <= near_tie)]
        rows.append(PromptComparison(a, b, gaps, first, ties))
    return rows


def report(label: str, rows: list[PromptComparison]) -> str:
    """A printed summary: per prompt, identical or where and at which logit gap the tokens first differ,
    and every near tie."""
    lines = [f"greedy generation, {label}: {len(rows)} prompts x {len(rows[0].ours)} new tokens"]
    for i, r in enumerate(rows):
        smallest = int(np.argmin(r.gaps))
        what = (
            "identical"
            if r.first_difference is None
            else f"first differ at step {r.first_difference} (transformers' top-2 gap there "
            f"{r.gaps[r.first_difference]:.3g}): ours {r.ours[r.first_difference]}, "
            f"transformers {r.theirs[r.first_difference]}"
        )
        ties = ", ".join(f"step {t} gap {r.gaps[t]:.3g}" for t in r.near_ties) or "none"
        lines.append(
            f"  prompt {i}: {what}; smallest gap {r.gaps[smallest]:.3g} at step {smallest}; near ties: {ties}"
        )
    return "\n".join(lines)


def check_generation(label: str, ours, theirs, logits) -> list[PromptComparison]:
    """Compare, print the report, and assert every difference starts at a near tie."""
    rows = compare_greedy(ours, theirs, logits, TOL["greedy_near_tie"].atol)
    text = report(label, rows)
    print(text)
    assert all(r.allowed for r in rows), text
    return rows


# ----------------------------------------------------------------------------------------- the default suite


class References:
    """transformers' greedy tokens and logits per variant, computed on first use (one torch model at a
    time), with the checkpoints and prompts they came from."""

    def __init__(self, model_dir: Path, root: Path):
        self.checkpoints, self.prompts = Checkpoints(model_dir, root), chat_prompts(model_dir)
        self.done: dict[str, tuple[list[list[int]], list[np.ndarray]]] = {}

    def __getitem__(self, variant: str) -> tuple[list[list[int]], list[np.ndarray]]:
        if variant not in self.done:
            model = load_torch(*self.checkpoints.of(variant))
            self.done[variant] = torch_greedy(model, self.prompts, NEW_TOKENS)
            del model
            gc.collect()
        return self.done[variant]

    def ours(self, variant: str, *, kernels: bool, alone: bool = False) -> list[list[int]]:
        """oftjax's greedy tokens for a variant, with the CPU kernels on (as ``oftjax generate`` runs on a
        CPU) or off (the pure-JAX default of other platforms)."""
        from oftjax import cpu_kernels

        model = load_ours(*self.checkpoints.of(variant))
        with cpu_kernels.enable() if kernels else contextlib.nullcontext():
            assert cpu_kernels.enabled() == kernels
            return ours_greedy(model, self.prompts, NEW_TOKENS, alone=alone)


@pytest.fixture(scope="module")
def two_layer_refs(smollm2_2layers, tmp_path_factory) -> References:  # noqa: F811
    return References(smollm2_2layers, tmp_path_factory.mktemp("generate-two-layers"))


# every variant with the CPU kernels; the QOFT case (NF4 + adapter) with the pure-JAX default too
CASES = [pytest.param(v, True, id=f"{v}-cpu_kernels") for v in VARIANTS] + [
    pytest.param("nf4+adapter", False, id="nf4+adapter-pure_jax")
]


@pytest.mark.parametrize("variant, kernels", CASES)
def test_greedy_generation_matches_transformers_two_layers(two_layer_refs, variant, kernels):
    theirs, logits = two_layer_refs[variant]
    ours = two_layer_refs.ours(variant, kernels=kernels)
    check_generation(f"SmolLM2 cut to two layers, {variant}", ours, theirs, logits)


def test_the_adapter_changes_the_generation_two_layers(two_layer_refs):
    """The comparisons with an adapter are not those without: the trained adapter changes the tokens."""
    for base in ("float", "nf4"):
        assert two_layer_refs[base][0] != two_layer_refs[base + "+adapter"][0], base


# --------------------------------------------------------------------------------- the whole model (-m slow)


@pytest.fixture(scope="module")
def full_refs(smollm2_dir, tmp_path_factory) -> References:  # noqa: F811
    return References(smollm2_dir, tmp_path_factory.mktemp("generate-smollm2"))


@pytest.mark.slow
@pytest.mark.parametrize("variant, kernels", CASES)
def test_greedy_generation_matches_transformers(full_refs, variant, kernels):
    theirs, logits = full_refs[variant]
    check_generation(
        f"SmolLM2-135M-Instruct, {variant}", full_refs.ours(variant, kernels=kernels), theirs, logits
    )


@pytest.mark.slow
def test_the_adapter_changes_the_generation(full_refs):
    for base in ("float", "nf4"):
        assert full_refs[base][0] != full_refs[base + "+adapter"][0], base
