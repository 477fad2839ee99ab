"""What generation needs from a checkpoint besides the model: prompt ids, stop tokens, text as it streams.

* ``stop_token_ids(model_dir)``: the eos ids transformers' ``generate`` stops at: ``generation_config.json``'s
  ``eos_token_id`` (an int or a list), else ``config.json``'s; and the pad id for left padding.
* ``chat_prompt_ids(chat_tokenizer, messages)``: a conversation rendered by the checkpoint's chat template
  with the generation prompt (the assistant header), encoded without added special tokens: the ids of
  transformers' ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``.
* ``decode_ids`` and ``TextStream``: token ids to text, special tokens skipped; ``TextStream`` gives the
  text a growing row adds, holding back an incomplete UTF-8 character (a byte-level or byte-fallback token
  may carry part of one) until the token that completes it arrives.

The tokenizer objects are duck-typed (this layer imports no application code): a ``tokenizers.Tokenizer``
(``decode(ids, skip_special_tokens=...)``), or anything whose ``decode(ids)`` already drops special tokens
(``oftjax.data.ByteTokenizer``); a chat tokenizer is ``oftjax.chat_data.ChatTokenizer`` (``template`` and
``tokenizer``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TextStream", "chat_prompt_ids", "decode_ids", "stop_token_ids"]

# What a decoder writes for bytes that do not (yet) form a character.
_REPLACEMENT = "\ufffd"


def _json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_ids(value: Any, where: str, vocab_size: int | None) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (vocab_size and v >= vocab_size):
            limit = f" < vocab_size {vocab_size}" if vocab_size else ""
            raise ValueError(
                f"{where}: expected a token id (an integer >= 0{limit}) or a list of them, got {v!r}"
            )
    return tuple(values)


def stop_token_ids(model_dir: str | Path, vocab_size: int | None = None) -> tuple[tuple[int, ...], int]:
    """``(eos ids, pad id)`` of a checkpoint directory, as transformers' ``generate`` reads them.

    The eos ids: ``generation_config.json``'s ``eos_token_id`` when the file has one, else ``config.json``'s
    (none: generation runs to ``max_new_tokens``). The pad id (left padding, and what a stopped row is
    filled with; masked, so any id serves): ``pad_token_id`` of the same files, else the first eos id, else 0.

    Raises:
      ValueError: a file that is not a JSON object, or an id that is not an integer in the vocabulary (the
        file and key named).

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = (Path(d) / "config.json").write_text('{"eos_token_id": 2, "pad_token_id": null}')
      ...     _ = (Path(d) / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
      ...     stop_token_ids(d)
      ((2, 7), 2)
    """
    model_dir = Path(model_dir)
    eos: tuple[int, ...] | None = None
    pad: int | None = None
    for name in ("generation_config.json", "config.json"):
        config = _json_object(model_dir / name)
        if config is None:
            continue
        if eos is None and config.get("eos_token_id") is not None:
            eos = _token_ids(config["eos_token_id"], f"{model_dir / name}: eos_token_id", vocab_size)
        if pad is None and config.get("pad_token_id") is not None:
            (pad,) = _token_ids(config["pad_token_id"], f"{model_dir / name}: pad_token_id", vocab_size)
    eos = eos or ()
    return eos, pad if pad is not None else (eos[0] if eos else 0)


def chat_prompt_ids(chat_tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """``messages`` rendered with the chat template and the generation prompt, as token ids.

    Args:
      chat_tokenizer: an ``oftjax.chat_data.ChatTokenizer`` (its ``template`` and ``tokenizer``).
      messages: ``{"role", "content"}`` dicts; the model answers after the last one.

    Raises:
      ValueError: the checkpoint has no chat template, or the template refused the messages.
    """
    template = chat_tokenizer.template
    if template is None:
        raise ValueError("the checkpoint has no chat template (chat_template.jinja or tokenizer_config.json)")
    try:
        text, _ = template.render(messages, add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateError (the template's raise_exception) and its kin
        raise ValueError(f"the chat template ({template.origin}) refused the messages: {e}") from e
    return list(chat_tokenizer.tokenizer.encode(text, add_special_tokens=False).ids)


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ``ids`` with special tokens skipped (``tokenizers.Tokenizer`` or a ``decode(ids)`` that
    drops them itself, as ``oftjax.data.ByteTokenizer``).

    Example:
      >>> class Bytes:
      ...     def decode(self, ids): return bytes(ids).decode("utf-8", errors="replace")
      >>> decode_ids(Bytes(), [104, 105])
      'hi'
    """
    ids = [int(i) for i in ids]
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # a decode(ids) without the keyword
        return tokenizer.decode(ids)


class TextStream:
    """The text a growing row of tokens adds, for printing as tokens arrive.

    Each ``push`` decodes the row's tokens so far and returns what follows the text already returned, so a
    character spread over several tokens, or a token whose text depends on its neighbours, prints correctly.
    A decoded text that ends in an incomplete character (U+FFFD) is held back until a later token completes
    it; ``finish`` returns whatever is left.

    Example:
      >>> class Bytes:
      ...     def decode(self, ids): return bytes(ids).decode("utf-8", errors="replace")
      >>> s = TextStream(Bytes())
      >>> [s.push([0xC3]), s.push([0xA9, 0x21]), s.finish()]
      ['', 'é!', '']
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in new_ids)
        text = decode_ids(self.tokenizer, self.ids)
        if text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text)

    def finish(self) -> str:
        return self._advance(decode_ids(self.tokenizer, self.ids))

    def _advance(self, text: str) -> str:
        # Text already printed cannot be taken back: should a later token change the decoding of earlier
        # ones, the new text is still taken from the length printed so far.
        new = text[len(self.printed) :]
        if new:
            self.printed = text
        return new
