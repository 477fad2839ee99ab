"""Reading chat and instruction rows from JSONL / JSON files and validating them, with file:line errors.

A row is a JSON object in one of three formats (other keys of the row, like ``id`` or ``topic``, are ignored):

* ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: a chat. An optional
  system message comes first, there is at least one user turn, assistant turns are not empty, and the last
  message is the assistant's (the answer to learn). Message keys whose value is null are dropped, as
  transformers does; any other key than ``role`` / ``content`` is refused.
* ``{"prompt": str, "completion": str}``: an instruction and its answer (a non-empty completion).
* ``{"text": str}``: plain text (not empty).

Files: JSON Lines (one row per line, blank lines skipped), or a JSON array of rows (a file whose first
non-blank character is ``[``). A JSONL line that is not valid UTF-8 or JSON is a bad row like any other; a
JSON array is one document, so its syntax and encoding errors stop the file whatever ``skip_bad_rows`` says.
Parquet is not read (it would need pyarrow): convert it to JSONL.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json")


class ChatDataError(ValueError):
    """A data file or row that cannot be used: ``source`` is ``path:line``, ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class RowError(ValueError):
    """Why one row is bad (the caller adds the file and line)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """A validated row. ``kind`` is "chat" (``messages``), "prompt_completion" or "text"."""

    source: str
    kind: str
    messages: tuple[Mapping[str, str], ...] = ()
    prompt: str = ""
    completion: str = ""
    text: str = ""


def data_files(path: str | Path) -> list[Path]:
    """``path`` itself, or the ``*.jsonl`` / ``*.json`` files under a folder in sorted order.

    Raises:
      ChatDataError: the path does not exist, is Parquet, or a folder holds no such file.
    """
    root = Path(path)
    if not root.exists():
        raise ChatDataError(
            str(root), "data path not found (expected a .jsonl / .json file or a folder of them)"
        )
    if root.is_file():
        if root.suffix == ".parquet":
            raise ChatDataError(str(root), "Parquet is not supported (it needs pyarrow): convert it to JSONL")
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise ChatDataError(str(root), "no .jsonl or .json file in this folder")
    return files


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(path:line, parsed JSON value or RowError)`` for every row of one file.

    Raises:
      ChatDataError: a JSON array file that does not decode or parse (the whole file is one document).
    """
    raw = path.read_bytes()
    if raw.lstrip()[:1] == b"[":
        yield from _array_records(path, raw)
        return
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield source, RowError(f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
            continue
        try:
            yield source, json.loads(text)
        except json.JSONDecodeError as e:
            yield source, RowError(f"invalid JSON ({e.msg} at column {e.colno})")


def _array_records(path: Path, raw: bytes) -> Iterator[tuple[str, Any]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ChatDataError(f"{path}:{line}", f"not valid UTF-8 (byte 0x{raw[e.start]:02x})") from e
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    first = True
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            if _skip_space(text, pos + 1) != len(text):
                raise _syntax(path, text, pos + 1, "extra data after the array")
            return
        if not first:
            if pos >= len(text) or text[pos] != ",":
                raise _syntax(path, text, pos, "expected ',' or ']' between rows")
            pos = _skip_space(text, pos + 1)
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _syntax(path, text, e.pos, e.msg) from e
        yield f"{path}:{text.count(chr(10), 0, pos) + 1}", value
        pos, first = end, False


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _syntax(path: Path, text: str, pos: int, message: str) -> ChatDataError:
    return ChatDataError(f"{path}:{text.count(chr(10), 0, pos) + 1}", f"invalid JSON array ({message})")


def parse_row(value: Any, source: str) -> Row:
    """Validate one parsed JSON value as a row.

    Raises:
      RowError: the reason, naming the key or message at fault.
    """
    if not isinstance(value, dict):
        raise RowError(f"a row must be a JSON object, got {_json_type(value)}")
    formats = [k for k in ("messages", "prompt", "text") if k in value]
    if "completion" in value and "prompt" not in value:
        raise RowError("missing key 'prompt' (a row with 'completion' needs its 'prompt')")
    if not formats:
        raise RowError(f"no 'messages', 'prompt'/'completion' or 'text' key (keys: {sorted(value)})")
    if len(formats) > 1:
        raise RowError(f"ambiguous row: it has {formats}; use exactly one format")
    if formats[0] == "messages":
        return Row(source, "chat", messages=_messages(value["messages"]))
    if formats[0] == "prompt":
        if "completion" not in value:
            raise RowError("missing key 'completion' (a row with 'prompt' needs its 'completion')")
        prompt, completion = _string(value, "prompt"), _string(value, "completion")
        if not completion.strip():
            raise RowError("empty completion")
        return Row(source, "prompt_completion", prompt=prompt, completion=completion)
    text = _string(value, "text")
    if not text.strip():
        raise RowError("empty text")
    return Row(source, "text", text=text)


def _messages(value: Any) -> tuple[Mapping[str, str], ...]:
    if not isinstance(value, list):
        raise RowError(f"'messages' must be a list, got {_json_type(value)}")
    if not value:
        raise RowError("'messages' is empty")
    out = tuple(_message(i, m) for i, m in enumerate(value))
    roles = [m["role"] for m in out]
    if "user" not in roles:
        raise RowError("no user turn: a chat row needs a prompt to answer")
    if roles[-1] != "assistant":
        raise RowError(
            f"the last message (messages[{len(roles) - 1}]) is a {roles[-1]!r} turn; a chat row ends "
            "with the assistant's answer"
        )
    return out


def _message(i: int, m: Any) -> Mapping[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise RowError(f"{where} must be an object, got {_json_type(m)}")
    m = {k: v for k, v in m.items() if v is not None}  # transformers drops null-valued keys too
    missing = [k for k in ("role", "content") if k not in m]
    if missing:
        raise RowError(f"{where} is missing key(s) {missing}")
    extra = sorted(set(m) - {"role", "content"})
    if extra:
        raise RowError(f"{where} has unsupported key(s) {extra} (only 'role' and 'content' are read)")
    role, content = m["role"], m["content"]
    if not isinstance(role, str):
        raise RowError(f"{where}.role must be a string, got {_json_type(role)}")
    if role not in ROLES:
        raise RowError(f"{where}.role {role!r} is not one of {list(ROLES)}")
    if not isinstance(content, str):
        raise RowError(f"{where}.content must be a string, got {_json_type(content)}")
    if role == "system" and i != 0:
        raise RowError(f"{where} is a system message after the first message")
    if role == "assistant" and not content.strip():
        raise RowError(f"{where} is an empty assistant turn")
    return {"role": role, "content": content}


def _string(row: Mapping[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"'{key}' must be a string, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
