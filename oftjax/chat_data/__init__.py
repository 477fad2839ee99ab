"""Chat and instruction data for fine-tuning: JSONL / JSON rows rendered with the checkpoint's chat template.

Rows are ``{"messages": [...]}`` chats, ``{"prompt", "completion"}`` instructions or ``{"text"}`` (formats
and validation: ``_rows.py``). Chats are rendered with the checkpoint's chat template exactly as
transformers' ``apply_chat_template`` renders them (``_template.py``) and tokenized with its
``tokenizer.json`` through the ``tokenizers`` library (no torch); the loss mask covers the assistant's
answers (``_encode.py``). Bad rows raise ``ChatDataError`` naming the file, the line and the reason, or are
skipped and counted; truncation at ``seq_len`` is counted (``ChatDataReport``).

A small real instruction set made offline from the Python documentation ships with the package
(``pydoc_chat_paths``; rebuilt by ``python -m oftjax.chat_data build-pydoc-set OUT_DIR``).

Example:
    >>> from oftjax.chat_data import load_chat_data, pydoc_chat_paths
    >>> train = pydoc_chat_paths()["train"]
    >>> data = load_chat_data(train, "smollm2-135m-instruct", seq_len=512)  # doctest: +SKIP
    >>> print(data.report.summary())  # doctest: +SKIP
"""

from oftjax.chat_data._encode import LOSS_ON as LOSS_ON
from oftjax.chat_data._encode import ChatTokenizer as ChatTokenizer
from oftjax.chat_data._encode import overlap_mask as overlap_mask
from oftjax.chat_data._load import ChatData as ChatData
from oftjax.chat_data._load import ChatDataReport as ChatDataReport
from oftjax.chat_data._load import ChatExample as ChatExample
from oftjax.chat_data._load import load_chat_data as load_chat_data
from oftjax.chat_data._load import padded_arrays as padded_arrays
from oftjax.chat_data._pydoc_set import build_pydoc_set as build_pydoc_set
from oftjax.chat_data._pydoc_set import pydoc_chat_paths as pydoc_chat_paths
from oftjax.chat_data._pydoc_set import pydoc_rows as pydoc_rows
from oftjax.chat_data._rows import ChatDataError as ChatDataError
from oftjax.chat_data._rows import Row as Row
from oftjax.chat_data._rows import RowError as RowError
from oftjax.chat_data._rows import parse_row as parse_row
from oftjax.chat_data._template import ChatTemplate as ChatTemplate

__all__ = [
    "LOSS_ON",
    "ChatData",
    "ChatDataError",
    "ChatDataReport",
    "ChatExample",
    "ChatTemplate",
    "ChatTokenizer",
    "Row",
    "RowError",
    "build_pydoc_set",
    "load_chat_data",
    "overlap_mask",
    "padded_arrays",
    "parse_row",
    "pydoc_chat_paths",
    "pydoc_rows",
]
