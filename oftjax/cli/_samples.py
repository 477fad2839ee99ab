"""``oftjax train``'s samples: what the base and the fine-tuned model answer to a few held-out prompts.

Every run writes ``samples.md`` (to read) and ``samples.jsonl`` (one object per prompt) in its directory:
for ``--samples N`` held-out prompts (default 4; 0: none), the base model's greedy answer, made when the run
starts, and the fine-tuned model's, made when it ends, each at most ``--sample-tokens`` new tokens, and the
data's own answer (the reference) when it has one. The prompts:

* chat / instruction rows: the held-out rows (``--eval-data``, else the rows ``--eval-fraction`` holds out,
  chosen as training chooses them), their prompt turns rendered with the chat template and the generation
  prompt (the last assistant turn is the reference; a prompt/completion row is a user turn); text rows: the
  first tokens of the text;
* raw text: the first tokens (up to ``PROMPT_TOKENS``, at most half the row) of held-out rows; the rest of
  the row is the reference.

The base answers come from the same model with every OFT rotation set to the identity (zero parameters: the
base model's forward exactly, as disabling the adapters gives), so one compiled generation program serves
both (docs/generation.md, "Samples in every training run"). All prompts decode as one batch. Only process 0
writes (atomically); a multi-process run writes no samples.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "PROMPT_TOKENS",
    "Sample",
    "Samples",
    "add_sample_arguments",
    "check_sample_args",
    "finish_samples",
    "render_markdown",
    "start_samples",
]

PROMPT_TOKENS = 48  # raw text: the prompt is the first tokens of a held-out row, at most this many
SAMPLE_FILES = ("samples.md", "samples.jsonl")


def add_sample_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--samples`` and ``--sample-tokens`` on the ``train`` parser."""
    g = p.add_argument_group("samples (samples.md, samples.jsonl in the run directory)")
    g.add_argument(
        "--samples",
        type=int,
        default=4,
        metavar="N",
        help="held-out prompts answered by the base (at the start) and the fine-tuned model (at the end), "
        "greedy; 0: none (default: %(default)s)",
    )
    g.add_argument(
        "--sample-tokens",
        type=int,
        default=48,
        metavar="N",
        help="new tokens per answer (default: %(default)s)",
    )
    return p


def check_sample_args(args: argparse.Namespace) -> None:
    from oftjax.cli._validate import fail

    if args.samples < 0:
        fail(f"--samples must be >= 0 (0: none), got {args.samples}")
    if args.sample_tokens < 1:
        fail(f"--sample-tokens must be >= 1, got {args.sample_tokens}")


@dataclasses.dataclass
class Sample:
    """One held-out prompt and the answers to it.

    Attributes:
      source: where the prompt comes from (``path:line`` of a row, or ``held-out row i`` of packed text).
      prompt_ids: the prompt's token ids.
      prompt: the prompt as text (chat: one ``role: content`` line per turn).
      reference: the data's own answer, or None.
      messages: a chat prompt's turns (None for text).
      base, fine_tuned: the decoded answers (None until made); ``*_tokens``: their token counts.
    """

    source: str
    prompt_ids: list[int]
    prompt: str
    reference: str | None = None
    messages: list[dict[str, str]] | None = None
    base: str | None = None
    fine_tuned: str | None = None
    base_tokens: int = 0
    fine_tuned_tokens: int = 0

    def record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "prompt_tokens": len(self.prompt_ids)}


@dataclasses.dataclass
class Samples:
    """The run's samples and what generating them needs; ``start`` and ``finish`` write the files."""

    samples: list[Sample]
    tokenizer: Any
    sampling: Any
    output: Path
    kind: str
    say: Callable[[str], None]
    seconds: float = 0.0

    def start(self, model: Any) -> None:
        t0 = time.perf_counter()
        with identity_rotations(model):
            self._answer(model, "base")
        self.seconds += time.perf_counter() - t0
        self.say(f"samples: base answers to {len(self.samples)} held-out prompts in {self.seconds:.1f} s")
        self.write()

    def finish(self, model: Any) -> None:
        t0 = time.perf_counter()
        self._answer(model, "fine_tuned")
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.write()
        self.say(
            f"samples: fine-tuned answers in {seconds:.1f} s ({self.seconds:.1f} s in all); wrote "
            f"{self.output / 'samples.md'}"
        )

    def _answer(self, model: Any, which: str) -> None:
        from oftjax.generate import decode_ids, generate

        result = generate(model, [s.prompt_ids for s in self.samples], self.sampling)
        for sample, tokens in zip(self.samples, result.tokens, strict=True):
            setattr(sample, which, decode_ids(self.tokenizer, tokens))
            setattr(sample, f"{which}_tokens", len(tokens))

    def write(self) -> None:
        from interop._io import atomic_write_bytes
        from oftjax.train import is_primary

        if not is_primary():
            return
        lines = [json.dumps(s.record(), ensure_ascii=False) for s in self.samples]
        atomic_write_bytes(self.output / "samples.jsonl", ("\n".join(lines) + "\n").encode(), force=True)
        text = render_markdown(self.samples, self.sampling.max_new_tokens, self.kind)
        atomic_write_bytes(self.output / "samples.md", text.encode(), force=True)


@contextlib.contextmanager
def identity_rotations(model: Any) -> Iterator[None]:
    """Every OFT rotation parameter set to zero (the identity rotation: the base model's forward) inside
    the context; the values come back after it. The model's structure stays as it is, so a jitted function
    of it compiled for the adapted model runs this one without compiling again."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from oftjax.nn import OFTParam

    params = nnx.state(model, OFTParam)
    saved = jax.tree.map(lambda x: x, params)  # the arrays, detached from the variables
    nnx.update(model, jax.tree.map(jnp.zeros_like, params))
    try:
        yield
    finally:
        nnx.update(model, saved)


def start_samples(
    args: argparse.Namespace, data: Any, base: Any, evald: Any, say: Callable[[str], None]
) -> Samples | None:
    """The held-out prompts (module docstring), answered by the base model and written; None when
    ``--samples 0``, without held-out data, or in a multi-process run."""
    import jax

    from oftjax.generate import SamplingConfig, stop_token_ids

    if args.samples == 0:
        return None
    if jax.process_count() > 1:
        say("samples: none in a multi-process run (oftjax generate answers prompts with the adapter)")
        return None
    if data.rows is not None:
        samples, tokenizer, kind = _row_samples(args, data, base.model_dir)
    else:
        tokenizer, kind = base.tokenizer, "text"
        samples = _text_samples(args, evald, tokenizer)
    limit = base.model.config.max_position_embeddings - args.sample_tokens
    samples = [s for s in samples if len(s.prompt_ids) <= limit][: args.samples]
    if not samples:
        say("samples: no held-out prompt to answer")
        return None
    eos, pad = stop_token_ids(base.model_dir, base.model.config.vocab_size)
    sampling = SamplingConfig(max_new_tokens=args.sample_tokens, eos_token_ids=eos, pad_token_id=pad)
    out = Samples(samples, tokenizer, sampling, args.output, kind, say)
    out.start(base.model)
    return out


def finish_samples(samples: Samples | None, model: Any) -> None:
    """The fine-tuned answers (after training), written beside the base ones."""
    if samples is not None:
        samples.finish(model)


def _text_samples(args: argparse.Namespace, evald: Any, tokenizer: Any) -> list[Sample]:
    """The first tokens of held-out rows (real tokens only: padding is out of the loss mask)."""
    from oftjax.generate import decode_ids

    samples: list[Sample] = []
    if evald is None:
        return samples
    for i in range(len(evald)):
        mask = evald.loss_mask[i]
        n = int(mask.argmin()) if not mask.all() else int(mask.size)
        ids = [int(t) for t in evald.input_ids[i][:n]]
        k = min(PROMPT_TOKENS, n // 2)
        if k < 1:
            continue
        rest = ids[k : k + args.sample_tokens]
        samples.append(
            Sample(f"held-out row {i}", ids[:k], decode_ids(tokenizer, ids[:k]), decode_ids(tokenizer, rest))
        )
        if len(samples) == args.samples:
            break
    return samples


def _row_samples(args: argparse.Namespace, data: Any, model_dir: Path) -> tuple[list[Sample], Any, str]:
    from oftjax.chat_data import ChatTokenizer

    tokenizer = ChatTokenizer.from_checkpoint(model_dir)
    samples = []
    for row in _held_out_rows(args, data, tokenizer):
        try:
            samples.append(_row_sample(tokenizer, row, args.sample_tokens))
        except ValueError:  # the template refused it: training skipped or refused the row too
            continue
    return samples, tokenizer.tokenizer, "rows"


def _held_out_rows(args: argparse.Namespace, data: Any, tokenizer: Any) -> list[Any]:
    """The first held-out rows: of ``--eval-data``, else those ``split_examples`` holds out of ``--data``
    (the data encoded again, as training encoded it, to know which rows training kept)."""
    from oftjax.chat_data import load_chat_data
    from oftjax.chat_data._rows import RowError, data_files, parse_row, read_records
    from oftjax.data import split_examples

    wanted: set[str] | None = None
    files = data_files(data.eval_path if data.eval_path is not None else data.rows)
    if data.eval_path is None:
        loaded = load_chat_data(
            data.rows, tokenizer, seq_len=args.seq_len, loss_on=args.loss_on, skip_bad_rows=args.skip_bad_rows
        )
        _, held_out = split_examples(loaded.examples, args.eval_fraction, seed=args.seed)
        wanted = {e.source for e in held_out[: args.samples]}
    rows = []
    for file in files:
        for source, record in read_records(file):
            if wanted is not None and source not in wanted:
                continue
            try:
                if isinstance(record, RowError):
                    raise record
                rows.append(parse_row(record, source))
            except RowError:
                continue  # a bad row is reported by training's own loading
            if len(rows) == args.samples:
                return rows
    return rows


def _row_sample(tokenizer: Any, row: Any, sample_tokens: int) -> Sample:
    """A row's prompt (chat turns with the generation prompt, or the start of a text) and its answer."""
    from oftjax.generate import chat_prompt_ids, decode_ids

    if row.kind == "text":
        ids = list(tokenizer.tokenizer.encode(row.text, add_special_tokens=True).ids)
        k = max(1, min(PROMPT_TOKENS, len(ids) // 2))
        text = decode_ids(tokenizer.tokenizer, ids[:k])
        return Sample(row.source, ids[:k], text, decode_ids(tokenizer.tokenizer, ids[k : k + sample_tokens]))
    if row.kind == "prompt_completion":
        messages, reference = [{"role": "user", "content": row.prompt}], row.completion
        if tokenizer.template is None:
            ids = list(tokenizer.tokenizer.encode(row.prompt, add_special_tokens=True).ids)
            return Sample(row.source, ids, row.prompt, reference)
    else:
        last = max(i for i, m in enumerate(row.messages) if m["role"] != "assistant")
        messages = [dict(m) for m in row.messages[: last + 1]]
        reference = "\n\n".join(m["content"] for m in row.messages[last + 1 :])
    shown = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return Sample(row.source, chat_prompt_ids(tokenizer, messages), shown, reference, messages)


def render_markdown(samples: list[Sample], max_new_tokens: int, kind: str) -> str:
    """``samples.md``: per prompt, the prompt, "base:", "fine-tuned:" and (when known) "reference:"."""
    what = "held-out chat / instruction rows" if kind == "rows" else "held-out text: the first tokens of rows"
    parts = [
        "# Samples: base vs fine-tuned\n",
        f"Greedy answers, at most {max_new_tokens} new tokens, to {len(samples)} prompts from the {what}. "
        "The base model answered when the run started (its OFT rotations set to the identity), the "
        "fine-tuned model when it ended. Written by `oftjax train`; samples.jsonl holds the same.\n",
    ]
    for i, s in enumerate(samples, 1):
        parts.append(f"## {i}. {s.source}\n")
        parts.append(_block("prompt", s.prompt))
        parts.append(_block("base", s.base if s.base is not None else "(not generated)"))
        tuned = s.fine_tuned if s.fine_tuned is not None else "(not generated: made when the run ends)"
        parts.append(_block("fine-tuned", tuned))
        if s.reference is not None:
            parts.append(_block("reference", s.reference))
    return "\n".join(parts)


def _block(label: str, text: str) -> str:
    """``label:`` and the text verbatim in a fence no line of the text can close."""
    fence = "~~~"
    while any(line.lstrip().startswith(fence) for line in text.splitlines()):
        fence += "~"
    return f"{label}:\n\n{fence}text\n{text}\n{fence}\n"
