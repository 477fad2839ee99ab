"""Text data for causal-LM training: read text files, tokenize, pack into fixed-length sequences, batch.

Pipeline (all numpy, deterministic for a given seed):

1. ``read_texts(path)``: one text file, or every text-like file under a folder (recursively, sorted by path;
   hidden entries and ``__pycache__`` skipped; a file is text-like when it decodes as UTF-8 and has no NUL
   byte).
2. ``load_tokenizer(model_dir)``: the checkpoint's ``tokenizer.json`` (the ``tokenizers`` package) when the
   directory has one, else ``ByteTokenizer``.
3. ``pack(docs, seq_len)``: documents (each ``[bos] + ids + [eos]``) are concatenated and cut into rows of
   ``seq_len`` tokens; the last row is padded and masked out. Rows may span document boundaries (standard
   packing; the model attends across the boundary, the eos token marks it).
4. ``split`` holds out a fraction of rows for evaluation. The rows (``PackedData``) and the batch of a global
   step (``batch_at``) belong to the training layer (``oftjax.train``, which never imports this module) and
   are re-exported here.

Chat and instruction data (JSONL / JSON rows, ``is_row_data``) is read by ``oftjax.chat_data`` instead: each
row is one example (ids and a loss mask), ``split_examples`` holds some out, and ``padded_rows`` puts one
example per row, right-padded to ``seq_len``, so that no example attends to another and each one's positions
start at 0 (causal attention never looks at the padding after a token; the padding is out of the loss).
``pack_examples`` instead places several whole examples in a row, with segment ids from which the model's
``segment_mask`` and ``segment_positions`` keep each example to itself (benchmarks/RESULTS.md compares the
two).

Example:
    >>> tok = ByteTokenizer()
    >>> data = pack([tok.encode("hello world")], seq_len=8, bos_id=tok.bos_id, eos_id=tok.eos_id,
    ...             pad_id=tok.pad_id)
    >>> data.input_ids.shape, int(data.loss_mask.sum())
    ((2, 8), 13)
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from oftjax.train import PackedData as PackedData
from oftjax.train import batch_at as batch_at
from oftjax.train import num_batches_per_epoch as num_batches_per_epoch

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "PackedData",
    "batch_at",
    "is_row_data",
    "load_tokenizer",
    "num_batches_per_epoch",
    "pack",
    "pack_examples",
    "padded_rows",
    "read_texts",
    "segment_positions",
    "split",
    "split_examples",
    "tokenize",
]

_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}
ROW_SUFFIXES = (".jsonl", ".json")


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then ``<bos>`` 256, ``<eos>`` 257, ``<pad>`` 258.

    ``vocab_size`` is 259; a model may have a larger (padded) vocabulary. Decoding drops the specials and
    replaces invalid UTF-8 with U+FFFD.

    Example:
        >>> ByteTokenizer().encode("hi")
        [104, 105]
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's ``tokenizer.json`` (HF ``tokenizers``), with bos/eos/pad from its config files.

    Special tokens come from ``tokenizer_config.json`` (``bos_token``/``eos_token``/``pad_token``, strings or
    ``{"content": ...}`` dicts) and fall back to ``config.json``'s ``bos_token_id``/``eos_token_id``. A
    missing pad token uses eos (masked out anyway).
    """

    def __init__(self, model_dir: str | os.PathLike):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"{path}: cannot load tokenizer ({e})") from e
        tcfg = _read_json_or_empty(model_dir / "tokenizer_config.json")
        mcfg = _read_json_or_empty(model_dir / "config.json")

        def special(name: str) -> int | None:
            tok = tcfg.get(f"{name}_token")
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                tid = self._tok.token_to_id(tok)
                if tid is not None:
                    return tid
            tid = mcfg.get(f"{name}_token_id")
            return tid if isinstance(tid, int) else None

        self.bos_id = special("bos")
        self.eos_id = special("eos")
        pad = special("pad")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def _read_json_or_empty(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def load_tokenizer(model_dir: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """The checkpoint's tokenizer when ``model_dir/tokenizer.json`` exists, else a ``ByteTokenizer``."""
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer(model_dir)
    return ByteTokenizer()


def _read_text_file(path: Path) -> str | None:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # a FIFO would block, a device (/dev/zero) never ends: not text files
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_texts(path: str | os.PathLike, *, max_bytes: int | None = None) -> list[tuple[str, str]]:
    """Read a text file, or all text-like files under a folder, as ``[(relative path, text), ...]``.

    Files are visited in sorted path order so the result is the same on every run. Reading stops once
    ``max_bytes`` characters were collected (the last file is cut).

    Raises:
        ValueError: ``path`` does not exist, or holds no readable text.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root}: data path not found (expected a text file or a folder of text files)")
    if root.is_file():
        files = [root]
    else:
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
            files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
        files.sort()
    out: list[tuple[str, str]] = []
    total = 0
    for f in files:
        text = _read_text_file(f)
        if not text:
            continue
        if max_bytes is not None and total + len(text) > max_bytes:
            text = text[: max_bytes - total]
        out.append((str(f.relative_to(root)) if f != root else f.name, text))
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    if not out:
        raise ValueError(f"{root}: no UTF-8 text found (binary or empty files are skipped)")
    return out


def tokenize(texts: Sequence[str], tokenizer: ByteTokenizer | HFTokenizer) -> list[np.ndarray]:
    """Encode each text to an int32 id array (no special tokens; ``pack`` adds bos/eos)."""
    return [np.asarray(tokenizer.encode(t), dtype=np.int32) for t in texts]


def pack(
    docs: Sequence[np.ndarray | Sequence[int]],
    seq_len: int,
    *,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int,
) -> PackedData:
    """Concatenate ``[bos] + doc + [eos]`` for every document and cut into rows of ``seq_len`` tokens.

    The final partial row is padded with ``pad_id`` and its padding masked out of the loss.

    Raises:
        ValueError: ``seq_len < 2`` or there are no tokens.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 for next-token prediction, got {seq_len}")
    parts = []
    for d in docs:
        if bos_id is not None:
            parts.append(np.asarray([bos_id], np.int32))
        parts.append(np.asarray(d, np.int32))
        if eos_id is not None:
            parts.append(np.asarray([eos_id], np.int32))
    stream = np.concatenate(parts) if parts else np.zeros([0], np.int32)
    if stream.size == 0:
        raise ValueError("no tokens to pack (empty documents)")
    rows = -(-stream.size // seq_len)
    ids = np.full([rows * seq_len], pad_id, np.int32)
    ids[: stream.size] = stream
    mask = np.zeros([rows * seq_len], bool)
    mask[: stream.size] = True
    return PackedData(ids.reshape(rows, seq_len), mask.reshape(rows, seq_len))


def split(data: PackedData, eval_fraction: float, *, seed: int = 0) -> tuple[PackedData, PackedData]:
    """Split rows into (train, eval) after a seeded shuffle; eval gets ``round(N * eval_fraction)`` rows.

    Raises:
        ValueError: ``eval_fraction`` outside [0, 1) or too few rows to hold out any with a positive fraction.
    """
    train, held_out = _split_indices(len(data), eval_fraction, seed, "packed rows")
    return data.take(train), data.take(held_out)


def _split_indices(n: int, eval_fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, eval)`` indices of ``n`` items after a seeded shuffle: eval gets
    ``round(n * eval_fraction)``, at least one when the fraction is positive, and training keeps one."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n_eval == 0:
        n_eval = 1
    if n - n_eval < 1:
        raise ValueError(f"{n} {what} are too few to split with eval_fraction={eval_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def _data_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return files


def is_row_data(path: str | os.PathLike) -> bool:
    """True when ``path`` holds rows for ``oftjax.chat_data`` rather than raw text.

    Rows: a ``.jsonl`` / ``.json`` file, or a folder whose (non-hidden) files all have those suffixes. A
    folder that mixes them with other files is raw text (every text-like file read as a document).

    Example:
        >>> is_row_data("train.jsonl"), is_row_data("notes.txt")
        (True, False)
    """
    root = Path(path)
    if root.suffix in ROW_SUFFIXES and not root.is_dir():
        return True
    if not root.is_dir():
        return False
    files = _data_files(root)
    return bool(files) and all(f.suffix in ROW_SUFFIXES for f in files)


def split_examples(examples: Sequence, eval_fraction: float, *, seed: int = 0) -> tuple[list, list]:
    """``(train, eval)`` examples after a seeded shuffle (each keeps its original order); eval gets
    ``round(N * eval_fraction)`` of them, at least one when the fraction is positive.

    Raises:
        ValueError: ``eval_fraction`` outside [0, 1), or too few examples to keep one for training.
    """
    train, held_out = _split_indices(len(examples), eval_fraction, seed, "examples")
    return [examples[i] for i in train], [examples[i] for i in held_out]


def padded_rows(
    examples: Sequence, seq_len: int, pad_id: int, *, trim_bucket: int | None = None
) -> PackedData:
    """One example (``input_ids``, ``loss_mask``: ``oftjax.chat_data.ChatExample``) per row, right-padded to
    ``seq_len`` with ``pad_id`` (out of the loss); examples longer than ``seq_len`` keep their first tokens.
    ``trim_bucket``: batches are cut to their longest row rounded up to a multiple of it
    (``PackedData.trim_bucket``: padding per batch).

    Example:
        >>> from oftjax.chat_data import ChatExample
        >>> ex = ChatExample(np.array([5, 6, 7], np.int32), np.array([0, 1, 1], bool), "a.jsonl:1")
        >>> padded_rows([ex], 4, pad_id=0).input_ids.tolist()
        [[5, 6, 7, 0]]
    """
    from oftjax.chat_data import padded_arrays

    if not examples:
        raise ValueError("no examples to put in rows")
    return PackedData(*padded_arrays(examples, seq_len, pad_id), trim_bucket=trim_bucket)


def pack_examples(examples: Sequence, seq_len: int, pad_id: int) -> tuple[PackedData, np.ndarray]:
    """Whole examples placed in rows of ``seq_len`` tokens (first fit, in order): ``(rows, segment_ids)``.

    ``segment_ids`` int32 ``[N, T]`` numbers the examples of a row from 1 (padding: 0). An example's first
    token is never a target (the token before it belongs to another example), so the loss mask is cleared
    there. Examples longer than ``seq_len`` keep their first tokens.

    Example:
        >>> from oftjax.chat_data import ChatExample
        >>> ex = [ChatExample(np.array([5, 6, 7], np.int32), np.ones(3, bool), "a:1"),
        ...       ChatExample(np.array([8, 9], np.int32), np.ones(2, bool), "a:2")]
        >>> rows, seg = pack_examples(ex, 6, pad_id=0)
        >>> rows.input_ids.tolist(), seg.tolist(), rows.loss_mask.astype(int).tolist()
        ([[5, 6, 7, 8, 9, 0]], [[1, 1, 1, 2, 2, 0]], [[0, 1, 1, 0, 1, 0]])
    """
    if not examples:
        raise ValueError("no examples to pack")
    rows: list[list] = []  # per row: the examples in it
    free: list[int] = []
    for e in examples:
        n = min(int(e.input_ids.size), seq_len)
        i = next((r for r, room in enumerate(free) if room >= n), len(rows))
        if i == len(rows):
            rows.append([])
            free.append(seq_len)
        rows[i].append(e)
        free[i] -= n
    ids = np.full((len(rows), seq_len), pad_id, np.int32)
    mask = np.zeros((len(rows), seq_len), bool)
    seg = np.zeros((len(rows), seq_len), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row, 1):
            n = min(int(e.input_ids.size), seq_len)
            ids[r, at : at + n] = e.input_ids[:n]
            mask[r, at + 1 : at + n] = e.loss_mask[1:n]
            seg[r, at : at + n] = k
            at += n
    return PackedData(ids, mask, seg), seg


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Rotary positions restarting at 0 where the segment id changes along each row, as numpy int32
    (``oftjax.models.segment_positions``, which the train step computes in the jitted step).

    Example:
        >>> segment_positions(np.array([[1, 1, 1, 2, 2, 0]])).tolist()
        [[0, 1, 2, 0, 1, 0]]
    """
    from oftjax.models import segment_positions as positions

    return np.asarray(positions(np.asarray(segment_ids)), np.int32)
