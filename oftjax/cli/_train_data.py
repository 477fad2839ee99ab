"""``oftjax train``'s data: what pretrains the default base, and the rows OFT trains and evaluates on.

``--data`` is raw text (a text file or a folder of them: documents packed into ``--seq-len`` rows, as
``oftjax.data.pack`` does) or rows (``oftjax.data.is_row_data``: JSONL / JSON chat, prompt/completion or text
rows, encoded by ``oftjax.chat_data`` with the checkpoint's tokenizer and chat template, the loss on
``--loss-on`` tokens, one example per row right-padded to ``--seq-len``: no example attends to another).
``--data pydoc-chat`` names the chat set that ships with oftjax (its own held-out ``eval.jsonl`` included).
Held-out data: ``--eval-data`` (rows or text, like ``--data``), else ``--eval-fraction`` of the examples
(rows) or of the packed rows (text).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oftjax import default_job as dj
from oftjax.cli._train_args import fail

__all__ = ["PYDOC_CHAT", "TrainData", "datasets", "read_data", "resolve_data_names"]

PYDOC_CHAT = "pydoc-chat"
# --batching per-batch: a batch is cut to its longest example rounded up to this many tokens (few widths, so
# few compilations; benchmarks/bench_batching.py measures it)
TRIM_BUCKET = 64


@dataclasses.dataclass
class TrainData:
    """Where the run's text comes from.

    Attributes:
      pretrain: the default base's pretraining documents (None with ``--model``).
      finetune: raw-text documents OFT trains on, or None when it trains on ``rows``.
      rows: a rows file or folder (``oftjax.chat_data``), or None.
      eval_path: ``--eval-data`` (rows when ``rows`` is set, else text), or None.
    """

    pretrain: list[tuple[str, str]] | None
    finetune: list[tuple[str, str]] | None
    rows: Path | None = None
    eval_path: Path | None = None


def resolve_data_names(args: argparse.Namespace) -> None:
    """``--data pydoc-chat``: the packaged chat set's train file (its eval file unless ``--eval-data``)."""
    if args.data is not None and str(args.data) == PYDOC_CHAT:
        from oftjax.chat_data import pydoc_chat_paths

        paths = pydoc_chat_paths()
        args.data = paths["train"]
        if args.eval_data is None:
            args.eval_data = paths["eval"]


def check_data_args(args: argparse.Namespace) -> None:
    """What ``validate`` cannot know: rows need a checkpoint's tokenizer; ``--eval-data`` must exist."""
    from oftjax.data import is_row_data

    if args.eval_data is not None and not args.eval_data.exists():
        fail(f"{args.eval_data}: eval data path not found")
    if args.data is not None and is_row_data(args.data) and args.model is None:
        fail(
            f"{args.data}: chat / instruction rows need --model (a checkpoint with tokenizer.json and its "
            "chat template); the embedded default model has a byte vocabulary"
        )
    if args.eval_data is not None and args.data is not None:
        if is_row_data(args.eval_data) != is_row_data(args.data):
            kinds = {True: "rows (JSONL / JSON)", False: "raw text"}
            fail(
                f"--eval-data {args.eval_data} is {kinds[is_row_data(args.eval_data)]} but --data "
                f"{args.data} is {kinds[is_row_data(args.data)]}: give both in one kind"
            )


def read_data(args: argparse.Namespace, say: Callable[[str], None]) -> TrainData:
    """The default job's two slices, ``--data``, or (``--model`` alone) the standard library's sources."""
    from oftjax.data import is_row_data, read_texts

    pretrain = finetune = None
    if args.model is None:
        pretrain, finetune, ft_what = dj.default_texts(args.max_data_bytes)
        mb = sum(len(t) for _, t in pretrain) / 1e6
        say(
            f"data: pretraining on {len(pretrain)} files ({mb:.1f} MB) of Python standard library "
            f"sources; fine-tuning on {ft_what}"
        )
    if args.data is not None and is_row_data(args.data):
        return TrainData(pretrain, None, rows=args.data, eval_path=args.eval_data)
    if args.data is not None:
        finetune = read_texts(args.data, max_bytes=args.max_data_bytes)
        mb = sum(len(t) for _, t in finetune) / 1e6
        say(f"data: fine-tuning on {len(finetune)} files ({mb:.1f} MB) of text from {args.data}")
    elif args.model is not None:
        finetune = read_texts(dj.stdlib_dir(), max_bytes=args.max_data_bytes)
        say(f"data: fine-tuning on {len(finetune)} Python standard library source files")
    return TrainData(pretrain, finetune, eval_path=args.eval_data)


def datasets(
    args: argparse.Namespace, data: TrainData, model_dir: Path, tokenizer: Any, say: Callable[[str], None]
) -> tuple[Any, Any, dict]:
    """``(train rows, held-out rows, what the summary records about them)``."""
    if data.rows is not None:
        train, evald, info = _row_datasets(args, data, model_dir, say)
    else:
        train, evald, info = _text_datasets(args, data, tokenizer)
    if len(train) < args.batch_size:
        fail(
            f"only {len(train)} training sequences of {args.seq_len} tokens; need at least --batch-size "
            f"{args.batch_size} (more data or a shorter --seq-len)"
        )
    return train, evald, info


def _text_datasets(args: argparse.Namespace, data: TrainData, tokenizer: Any) -> tuple[Any, Any, dict]:
    from oftjax.data import pack, read_texts, split, tokenize

    def packed(docs: list[tuple[str, str]]):
        ids = tokenize([t for _, t in docs], tokenizer)
        eos, bos, pad = tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id
        return pack(ids, args.seq_len, bos_id=bos, eos_id=eos, pad_id=pad)

    rows = packed(data.finetune)
    if data.eval_path is not None:
        train, evald = rows, packed(read_texts(data.eval_path, max_bytes=args.max_data_bytes))
    else:
        train, evald = split(rows, args.eval_fraction, seed=args.seed)
    return train, evald, {"kind": "text", "train_rows": len(train), "eval_rows": len(evald)}


def _row_datasets(
    args: argparse.Namespace, data: TrainData, model_dir: Path, say: Callable[[str], None]
) -> tuple[Any, Any, dict]:
    from oftjax.chat_data import ChatTokenizer, load_chat_data
    from oftjax.data import pack_examples, padded_rows, split_examples

    tokenizer = ChatTokenizer.from_checkpoint(model_dir)

    def load(path: Path):
        loaded = load_chat_data(
            path, tokenizer, seq_len=args.seq_len, loss_on=args.loss_on, skip_bad_rows=args.skip_bad_rows
        )
        say(f"data: {path}: {loaded.report.summary()}")
        return loaded

    train_set = load(data.rows)
    info: dict[str, Any] = {"kind": "rows", "loss_on": args.loss_on, "train": _report(train_set.report)}
    if data.eval_path is not None:
        eval_set = load(data.eval_path)
        train, evald = train_set.examples, eval_set.examples
        info["eval"] = _report(eval_set.report)
    else:
        train, evald = split_examples(train_set.examples, args.eval_fraction, seed=args.seed)
        say(f"data: {len(evald)} of the {len(train_set.examples)} examples held out for evaluation")
    pad = tokenizer.pad_id
    held_out = padded_rows(evald, args.seq_len, pad, trim_bucket=TRIM_BUCKET) if evald else None
    if args.batching == "packed":
        rows = pack_examples(train, args.seq_len, pad)[0]
        say(f"data: {len(train)} training examples packed into {len(rows)} rows of {args.seq_len} tokens")
    else:
        trim = TRIM_BUCKET if args.batching == "per-batch" else None
        rows = padded_rows(train, args.seq_len, pad, trim_bucket=trim)
    info["train_examples"], info["eval_rows"] = len(train), len(evald)
    info["train_rows"], info["batching"] = len(rows), args.batching
    return rows, held_out, info


def _report(report: Any) -> dict:
    """The loading report as the summary keeps it (bad rows: the first few, with their reasons)."""
    out = dataclasses.asdict(report)
    out["skipped"] = [f"{source}: {reason}" for source, reason in report.skipped[:20]]
    out["skipped_count"] = len(report.skipped)
    return out
