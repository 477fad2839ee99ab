"""Rows to token ids and loss masks with a checkpoint's ``tokenizer.json`` and chat template (no torch).

Token ids are those of transformers' ``apply_chat_template(messages)``: the rendered conversation encoded
by the ``tokenizers`` library without added special tokens (the template writes them).

The loss mask (1 = the token is a training target), with ``loss_on="assistant"``:

* **chat rows, template with ``{% generation %}`` blocks**: transformers' assistant-token mask
  (``return_assistant_tokens_mask=True``): every token whose character span overlaps a generation block.
* **chat rows, template without them**: the tokens after the last prompt turn. With ``k`` the index of the
  last non-assistant message, ``prompt`` is the template's rendering of ``messages[:k+1]`` with
  ``add_generation_prompt=True`` and ``full`` the rendering of all messages; ``prompt`` must be a prefix of
  ``full`` (otherwise the row is refused), and the mask holds every token of ``full`` whose span overlaps
  ``full[len(prompt):]``: the final answer(s) and the template's end-of-turn tokens after them, not the
  assistant header the generation prompt already wrote. Earlier assistant turns are context, not targets.
* **prompt/completion rows**: the chat ``[user: prompt, assistant: completion]`` under the rules above
  (with a chat template), else the plain text ``prompt + completion`` encoded with the tokenizer's special
  tokens, the eos token appended, and the loss on the tokens overlapping the completion plus that eos.
* **text rows**: every token of the text encoded with the tokenizer's special tokens (as
  ``tokenizer(text)``), the eos token appended unless already last, so that a model learns to stop.

``loss_on="all"`` sets every token of every row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
import numpy as np

from oftjax.chat_data._rows import Row, RowError
from oftjax.chat_data._template import ChatTemplate, special_tokens

LOSS_ON = ("assistant", "all")


class ChatTokenizer:
    """A checkpoint's tokenizer (``tokenizer.json``) with its chat template and eos token.

    Example:
      >>> tok = ChatTokenizer.from_checkpoint("smollm2-135m-instruct")  # doctest: +SKIP
      >>> ids, mask = tok.encode(row, loss_on="assistant")  # doctest: +SKIP
    """

    def __init__(self, tokenizer, template: ChatTemplate | None, tokens: Mapping[str, str]):  # noqa: ANN001
        """``tokenizer``: a ``tokenizers.Tokenizer``; ``tokens``: the named special tokens by name."""
        self.tokenizer = tokenizer
        self.template = template
        self.eos_id = self._id(tokens.get("eos_token"))
        pad_id = self._id(tokens.get("pad_token"))
        # Padding is masked out of the loss; any id serves when the tokenizer names no pad token.
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> ChatTokenizer:
        """Load ``tokenizer.json``, the chat template and the special tokens of a checkpoint directory.

        Raises:
          ValueError: no ``tokenizer.json``, or it does not load (the file named).
        """
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{path}: not found; chat data needs the checkpoint's tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"{path}: cannot load the tokenizer ({e})") from e
        return cls(tokenizer, ChatTemplate.from_checkpoint(model_dir), special_tokens(model_dir))

    def encode(self, row: Row, *, loss_on: str = "assistant") -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int32 [n], loss_mask bool [n])`` of one row (rules in the module docstring).

        Raises:
          RowError: the template refused the row, or its prompt is not a prefix of the whole chat.
        """
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        if row.kind == "chat":
            ids, mask = self._chat(row.messages)
        elif row.kind == "prompt_completion" and self.template is not None:
            turns = (
                {"role": "user", "content": row.prompt},
                {"role": "assistant", "content": row.completion},
            )
            ids, mask = self._chat(turns)
        elif row.kind == "prompt_completion":
            ids, mask = self._plain(row.prompt, row.completion)
        else:
            ids, mask = self._plain("", row.text)
            mask = np.ones(len(ids), bool)  # text rows: every token, the tokenizer's own specials included
        ids = np.asarray(ids, np.int32)
        mask = np.ones(ids.shape, bool) if loss_on == "all" else np.asarray(mask, bool)
        return ids, mask

    def _render(self, messages: Sequence[Mapping[str, str]], **kwargs) -> tuple[str, list]:
        try:
            return self.template.render(messages, **kwargs)
        except jinja2.exceptions.TemplateError as e:
            raise RowError(f"the chat template ({self.template.origin}) refused the row: {e}") from e

    def _chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], np.ndarray]:
        if self.template is None:
            raise RowError(
                "the checkpoint has no chat template (chat_template.jinja or tokenizer_config.json)"
            )
        text, spans = self._render(messages)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if not self.template.has_generation_markers:
            last_prompt = max(i for i, m in enumerate(messages) if m["role"] != "assistant")
            prompt, _ = self._render(messages[: last_prompt + 1], add_generation_prompt=True)
            if not text.startswith(prompt):
                raise RowError(
                    "the chat template does not render the prompt turns (with the generation prompt) as a "
                    "prefix of the whole chat, so the answer's tokens cannot be located"
                )
            spans = [(len(prompt), len(text))]
        return encoding.ids, overlap_mask(encoding.offsets, spans)

    def _plain(self, prompt: str, completion: str) -> tuple[list[int], np.ndarray]:
        text = prompt + completion
        encoding = self.tokenizer.encode(text, add_special_tokens=True)
        ids = list(encoding.ids)
        mask = overlap_mask(encoding.offsets, [(len(prompt), len(text))])
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
            mask = np.append(mask, True)
        return ids, mask


def overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """True for each token whose character span ``[start, end)`` overlaps one of ``spans`` (sorted).

    The rule of transformers' ``return_assistant_tokens_mask``: a token cut by a span boundary counts.
    """
    mask = np.zeros(len(offsets), bool)
    j = 0
    for t, (start, end) in enumerate(offsets):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        if j == len(spans):
            break
        if end > spans[j][0]:
            mask[t] = True
    return mask
