"""A chat / instruction data set: files -> validated rows -> (ids, loss mask) examples, with a report."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from oftjax.chat_data._encode import LOSS_ON, ChatTokenizer
from oftjax.chat_data._rows import ChatDataError, RowError, data_files, parse_row, read_records


@dataclasses.dataclass(frozen=True)
class ChatExample:
    """One encoded row: ``input_ids`` int32 [n], ``loss_mask`` bool [n] (True: a training target)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    source: str


@dataclasses.dataclass
class ChatDataReport:
    """What loading did: rows read, bad rows skipped (with reasons), truncation at ``seq_len``.

    Attributes:
      rows: non-blank rows read.
      examples: rows kept as examples.
      skipped: ``(path:line, reason)`` of every bad row dropped with ``skip_bad_rows``.
      truncated: examples cut to ``seq_len`` tokens; ``truncated_tokens`` tokens were dropped from them.
      no_loss_tokens: rows dropped because truncation left none of their target tokens.
      tokens / loss_tokens: in the kept examples.
    """

    seq_len: int
    rows: int = 0
    examples: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    truncated: int = 0
    truncated_tokens: int = 0
    no_loss_tokens: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def summary(self) -> str:
        """One line for a log, e.g. "120 rows: 118 examples (30,120 tokens, 9,800 in the loss); 2 bad rows
        skipped; 3 truncated at seq_len 512 (410 tokens dropped)"."""
        text = f"{self.rows} rows: {self.examples} examples ({self.tokens:,} tokens, "
        text += f"{self.loss_tokens:,} in the loss)"
        if self.skipped:
            source, reason = self.skipped[0]
            text += f"; {len(self.skipped)} bad rows skipped (first: {source}: {reason})"
        text += f"; {self.truncated} truncated at seq_len {self.seq_len}"
        if self.truncated:
            text += f" ({self.truncated_tokens:,} tokens dropped)"
        if self.no_loss_tokens:
            text += f"; {self.no_loss_tokens} dropped with no target token left after truncation"
        return text


@dataclasses.dataclass(frozen=True)
class ChatData:
    examples: list[ChatExample]
    report: ChatDataReport


def load_chat_data(
    path: str | Path,
    tokenizer: ChatTokenizer | str | Path,
    *,
    seq_len: int,
    loss_on: str = "assistant",
    skip_bad_rows: bool = False,
) -> ChatData:
    """Read, validate and encode every row of a JSONL / JSON file (or a folder of them).

    Args:
      path: a ``.jsonl`` / ``.json`` file or a folder of them (sorted).
      tokenizer: a ``ChatTokenizer`` or the checkpoint directory to load one from.
      seq_len: examples longer than this keep their first ``seq_len`` tokens (counted in the report).
      loss_on: "assistant" (the rules of ``_encode.py``) or "all" tokens.
      skip_bad_rows: drop bad rows and list them in the report instead of raising on the first.

    Raises:
      ChatDataError: a bad row (``path:line: reason``) unless ``skip_bad_rows``; an unreadable file; no
        example at all.

    Example:
      >>> data = load_chat_data("chat.jsonl", "smollm2-135m-instruct", seq_len=512)  # doctest: +SKIP
      >>> print(data.report.summary())  # doctest: +SKIP
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 for next-token prediction, got {seq_len}")
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if not isinstance(tokenizer, ChatTokenizer):
        tokenizer = ChatTokenizer.from_checkpoint(tokenizer)
    report = ChatDataReport(seq_len=seq_len)
    examples = []
    for file in data_files(path):
        for source, record in read_records(file):
            report.rows += 1
            try:
                if isinstance(record, RowError):
                    raise record
                ids, mask = tokenizer.encode(parse_row(record, source), loss_on=loss_on)
            except RowError as e:
                if not skip_bad_rows:
                    raise ChatDataError(source, str(e)) from None
                report.skipped.append((source, str(e)))
                continue
            example = _truncate(ChatExample(ids, mask, source), seq_len, report)
            if example is not None:
                examples.append(example)
    if not examples:
        raise ChatDataError(str(path), f"no usable example ({report.summary()})")
    report.examples = len(examples)
    report.tokens = sum(int(e.input_ids.size) for e in examples)
    report.loss_tokens = sum(int(e.loss_mask.sum()) for e in examples)
    return ChatData(examples, report)


def _truncate(example: ChatExample, seq_len: int, report: ChatDataReport) -> ChatExample | None:
    n = int(example.input_ids.size)
    if n > seq_len:
        report.truncated += 1
        report.truncated_tokens += n - seq_len
        example = ChatExample(example.input_ids[:seq_len], example.loss_mask[:seq_len], example.source)
    # Position 0 is never a target (nothing predicts it), so an example needs a target after it.
    if not example.loss_mask[1:].any():
        report.no_loss_tokens += 1
        return None
    return example


def padded_arrays(
    examples: Sequence[ChatExample], seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """One example per row, right-padded to ``seq_len``: ``(input_ids int32 [N, T], loss_mask bool [N, T])``.

    Padding carries ``pad_id`` and is masked out of the loss; no row attends across examples.
    """
    ids = np.full((len(examples), seq_len), pad_id, np.int32)
    mask = np.zeros((len(examples), seq_len), bool)
    for i, e in enumerate(examples):
        n = min(int(e.input_ids.size), seq_len)
        ids[i, :n] = e.input_ids[:n]
        mask[i, :n] = e.loss_mask[:n]
    return ids, mask
