"""``oftjax generate``: text from a checkpoint (and a PEFT OFT adapter), greedy or sampled, streamed.

The checkpoint (a directory, or a Hub id in the local cache) loads as ``oftjax train`` and ``oftjax parity``
load it (``interop.hf_model.load_model``, ``--quant`` quantizing a float checkpoint as bitsandbytes would,
``interop.peft.load_adapter``), and ``oftjax.generate.generate`` decodes with a KV cache (docs/generation.md).
``--prompt TEXT`` or ``--prompts FILE.jsonl`` (rows ``{"prompt": ...}`` or ``{"messages": [...]}``); with
``--chat`` a prompt is a user message rendered by the checkpoint's chat template with the generation prompt
(``messages`` rows always are). Generation stops at the checkpoint's eos ids (``generation_config.json``,
else ``config.json``). One prompt streams to stdout as it is decoded; several decode as one batch and print
each answer after its prompt. Timings and the cache size go to stderr. Every argument and prompt is checked
before the model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import stat
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["Prompt", "add_generate_parser", "load_model_and_adapter", "read_prompts", "run_generate"]

QUANTS = ("none", "nf4", "fp4", "int8")
ROLES = ("system", "user", "assistant")


def add_generate_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="generate text from a model (+ PEFT OFT adapter) with a KV cache",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument(
        "--model", type=Path, required=True, help="HF checkpoint dir, or a Hub id in the local cache"
    )
    p.add_argument("--adapter", type=Path, default=None, help="PEFT OFT adapter dir (default: base only)")
    add_load_arguments(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt (streamed as it is decoded)")
    what.add_argument(
        "--prompts", type=Path, help='JSONL file: rows {"prompt": "..."} or {"messages": [...]}, one batch'
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="render each prompt as a user message with the checkpoint's chat template and generation prompt",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1: off (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="0: off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling key (default: %(default)s)")
    p.add_argument(
        "--cpu-kernels",
        choices=("auto", "on", "off"),
        default="auto",
        help="the opt-in C++ CPU kernels (oftjax.cpu_kernels); auto: on when JAX computes on the CPU",
    )
    p.set_defaults(func=run_generate)
    return p


def add_load_arguments(p: argparse.ArgumentParser, *, dtype_default: str | None = "float32") -> None:
    """``--quant``, ``--no-double-quant``, ``--dtype``, ``--strict-config`` (shared with ``oftjax merge``)."""
    p.add_argument(
        "--quant",
        choices=QUANTS,
        default="none",
        help="quantize a float checkpoint on load, as oftjax train does (a bnb checkpoint keeps its format) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--no-double-quant",
        dest="double_quant",
        action="store_false",
        help="4-bit without double quantization of the absmax (as oftjax train --no-double-quant)",
    )
    keep = "the checkpoint's own" if dtype_default is None else "%(default)s"
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=dtype_default,
        help=f"float weights and activations (default: {keep})",
    )
    p.add_argument(
        "--strict-config", action="store_true", help="refuse config.json keys oftjax does not know"
    )


# ------------------------------------------------------------------------------------------ checks


def fail(msg: str):
    from oftjax.cli import CLIError

    raise CLIError(msg)


def check_model_args(args: argparse.Namespace) -> dict:
    """``--model`` (resolved), ``--adapter``, and ``--quant`` against config.json (returned, checked)."""
    from oftjax.cli._model_source import resolve_model
    from oftjax.cli._validate import _read_config

    args.model = resolve_model(args.model)
    if not (args.model / "config.json").is_file():
        fail(f"{args.model}: not an HF checkpoint directory (no config.json)")
    if args.adapter is not None and not (args.adapter / "adapter_config.json").is_file():
        fail(f"{args.adapter}: not a PEFT adapter directory (no adapter_config.json)")
    config = _read_config(args.model / "config.json")
    own = checkpoint_format(config)
    if own is not None and args.quant not in ("none", own):
        fail(f"{args.model}: checkpoint is already quantized ({own}); omit --quant")
    return config


def checkpoint_format(config: dict) -> str | None:
    """The format of a bnb checkpoint's config.json ("int8", "nf4" or "fp4"), None for a float one."""
    q = config.get("quantization_config") or {}
    if q.get("load_in_8bit"):
        return "int8"
    if q.get("load_in_4bit"):
        return q.get("bnb_4bit_quant_type", "fp4")
    return None


def _check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        fail(f"--temperature must be finite and >= 0 (0: greedy), got {args.temperature}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        fail(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
    if args.top_k < 0:
        fail(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be in 0 .. 2**32 - 1, got {args.seed}")


# ----------------------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its token ids and what to show of it (the text, or the last user message)."""

    ids: list[int]
    shown: str


def load_tokenizer(model_dir: Path) -> Any:
    """The checkpoint's ``ChatTokenizer`` (tokenizer.json, chat template, specials), else the byte-level
    tokenizer of the embedded default model (a checkpoint without tokenizer.json, as ``oftjax train``)."""
    from oftjax.chat_data import ChatTokenizer
    from oftjax.data import ByteTokenizer

    if (model_dir / "tokenizer.json").is_file():
        return ChatTokenizer.from_checkpoint(model_dir)
    return ByteTokenizer()


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """A plain prompt's ids: what transformers' ``tokenizer(text)`` gives (the tokenizer's own special
    tokens); the byte-level tokenizer starts with bos, as every document of the default job does."""
    if hasattr(tokenizer, "template"):
        return list(tokenizer.tokenizer.encode(text, add_special_tokens=True).ids)
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def read_prompts(args: argparse.Namespace, tokenizer: Any) -> list[Prompt]:
    """``--prompt`` or every row of ``--prompts``, encoded; errors name the file and line."""
    from oftjax.generate import chat_prompt_ids

    rows = [("--prompt", args.prompt)] if args.prompt is not None else _rows(args.prompts)
    chat = hasattr(tokenizer, "template") and tokenizer.template is not None
    if (args.chat or any(isinstance(r, list) for _, r in rows)) and not chat:
        fail(
            f"{args.model}: chat prompts need the checkpoint's tokenizer.json and chat template; it has none"
        )
    prompts = []
    for source, row in rows:
        if isinstance(row, list) or args.chat:
            messages = row if isinstance(row, list) else [{"role": "user", "content": row}]
            try:
                ids = chat_prompt_ids(tokenizer, messages)
            except ValueError as e:
                fail(f"{source}: {e}")
            shown = messages[-1]["content"]
        else:
            ids, shown = text_ids(tokenizer, row), row
        if not ids:
            fail(f"{source}: the prompt encodes to no token")
        prompts.append(Prompt(ids, shown))
    return prompts


def _rows(path: Path) -> list[tuple[str, str | list]]:
    """``(path:line, prompt text or messages)`` of a JSONL prompts file."""
    from oftjax.chat_data._rows import RowError, read_records

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        fail(f"--prompts {path}: cannot read ({e.strerror})")
    if not stat.S_ISREG(mode):
        fail(f"--prompts {path}: not a regular file")
    rows = []
    for source, record in read_records(path):
        if isinstance(record, RowError):
            fail(f"{source}: {record}")
        rows.append((source, _prompt_row(record, source)))
    if not rows:
        fail(f"--prompts {path}: no prompt in the file")
    return rows


def _prompt_row(record: Any, source: str) -> str | list:
    if not isinstance(record, dict) or len({"prompt", "messages"} & set(record)) != 1:
        fail(f'{source}: expected an object with "prompt" (a string) or "messages" (a list)')
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            fail(f'{source}: "prompt" must be a string')
        return record["prompt"]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        fail(f'{source}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            fail(f'{source}: messages[{i}] must be an object with exactly "role" and "content"')
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            fail(f"{source}: messages[{i}]: role must be one of {list(ROLES)} and content a string")
    if messages[-1]["role"] == "assistant":
        fail(f"{source}: the last message is the assistant's; the model answers after a user turn")
    return messages


# ------------------------------------------------------------------------------------------- model


def load_model_and_adapter(args: argparse.Namespace) -> tuple[Any, str]:
    """The checkpoint (``--dtype``; quantized with ``--quant`` when float) with ``--adapter`` attached; and
    its weight format ("float", "int8", "nf4", "fp4", with " + double quant" when quantized here)."""
    import jax.numpy as jnp

    from interop.hf_model import load_model
    from interop.peft import load_adapter
    from oftjax.cli._train import checkpoint_quant
    from oftjax.train import quantize_model

    model = load_model(args.model, dtype=args.dtype, strict=args.strict_config)
    kind = checkpoint_quant(model) or "float"
    if kind == "float" and args.quant != "none":
        dtype = jnp.dtype(args.dtype) if args.dtype else jnp.float32
        quantize_model(model, args.quant, double_quant=args.double_quant, compute_dtype=dtype)
        kind = args.quant + (" + double quant" if args.quant != "int8" and args.double_quant else "")
    if args.adapter is not None:
        load_adapter(model, args.adapter)
    return model, kind


def cpu_kernels_context(setting: str):
    """``--cpu-kernels``: auto is on when JAX's default backend is the CPU."""
    import jax

    from oftjax import cpu_kernels

    on = setting == "on" or (setting == "auto" and jax.default_backend() == "cpu")
    return cpu_kernels.enable() if on else cpu_kernels.disable()


# --------------------------------------------------------------------------------------------- run


def run_generate(args: argparse.Namespace) -> int:
    """``oftjax generate``: check everything, load, decode, print (stdout: text; stderr: timings)."""
    import jax

    from oftjax.generate import SamplingConfig, stop_token_ids
    from oftjax.models import ModelConfig

    config = check_model_args(args)
    _check_sampling(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown config keys: loading the model warns about them once
        shape = ModelConfig.from_hf(config)
    eos, pad = stop_token_ids(args.model, shape.vocab_size)
    tokenizer = load_tokenizer(args.model)
    prompts = read_prompts(args, tokenizer)
    _check_lengths(args, prompts, shape.max_position_embeddings)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_ids=eos,
        pad_token_id=pad,
    )
    with cpu_kernels_context(args.cpu_kernels):
        model, _ = load_model_and_adapter(args)
        printer = _Printer(tokenizer, prompts)
        result = _decode(model, prompts, sampling, jax.random.key(args.seed), printer)
    printer.answers(result.tokens)
    print(printer.stats(result), file=sys.stderr, flush=True)
    return 0


def _check_lengths(args: argparse.Namespace, prompts: list[Prompt], limit: int) -> None:
    longest = max(len(p.ids) for p in prompts)
    if longest + args.max_new_tokens > limit:
        fail(
            f"a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"max_position_embeddings {limit}"
        )


def _decode(model: Any, prompts: list[Prompt], sampling: Any, key: Any, printer: _Printer) -> Any:
    from oftjax.generate import generate

    return generate(model, [p.ids for p in prompts], sampling, key=key, stream=printer.stream)


class _Printer:
    """Streams the single prompt's text to stdout (or prints every answer after its prompt when done) and
    keeps the arrival time of each chunk, for the steady decode rate (the first chunk compiles)."""

    def __init__(self, tokenizer: Any, prompts: list[Prompt]):
        from oftjax.generate import TextStream

        # the decoder: a ChatTokenizer's tokenizers.Tokenizer, or the byte-level tokenizer itself
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.prompts = prompts
        self.text = TextStream(self.tokenizer) if len(prompts) == 1 else None
        self.arrivals: list[tuple[float, int]] = []  # per decoded chunk: (time, tokens of every row)
        self.last_row = -1

    def stream(self, row: int, new: list[int]) -> None:
        # generate reports a chunk's rows in increasing order: a row not above the last starts a chunk
        now = time.perf_counter()
        if row > self.last_row and self.arrivals:
            self.arrivals[-1] = (now, self.arrivals[-1][1] + len(new))
        else:
            self.arrivals.append((now, len(new)))
        self.last_row = row
        if self.text is not None:
            sys.stdout.write(self.text.push(new))
            sys.stdout.flush()

    def answers(self, tokens: list[list[int]]) -> None:
        from oftjax.generate import decode_ids

        if self.text is not None:
            print(self.text.finish(), flush=True)
            return
        n = len(self.prompts)
        for i, (prompt, row) in enumerate(zip(self.prompts, tokens, strict=True), 1):
            print(
                f"=== prompt {i}/{n} ===\n{prompt.shown}\n--- answer ---\n{decode_ids(self.tokenizer, row)}\n"
            )
        sys.stdout.flush()

    def stats(self, result: Any) -> str:
        """The stderr line: prefill and decode throughput, and the KV cache's size."""
        n = len(self.prompts)
        decoded = sum(max(len(t) - 1, 0) for t in result.tokens)  # the first token of a row is prefill's
        text = (
            f"oftjax generate: {n} prompt{'s' if n > 1 else ''}; prefill {sum(result.prompt_tokens)} tokens "
            f"in {result.prefill_seconds:.2f} s ({result.prompt_tokens_per_s:,.1f} tokens/s, compilation "
            f"included); decode {decoded} tokens in {result.decode_seconds:.2f} s "
            f"({result.decode_tokens_per_s:,.1f} tokens/s"
        )
        steady = self._steady_rate()
        if steady is not None:
            text += f"; {steady:,.1f} tokens/s after the first decode chunk, which compiles"
        return text + f"); KV cache {result.cache_bytes / 2**20:,.2f} MiB"

    def _steady_rate(self) -> float | None:
        """Tokens per second between the end of the first decode chunk and the last one (None: too few)."""
        chunks = self.arrivals[1:]  # the first arrival is prefill's token
        if len(chunks) < 2 or chunks[-1][0] <= chunks[0][0]:
            return None
        return sum(n for _, n in chunks[1:]) / (chunks[-1][0] - chunks[0][0])
