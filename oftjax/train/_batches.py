"""Packed training rows and the batch of a global step (numpy; no tokenizer, no files).

``PackedData`` holds fixed-length rows; ``batch_at(data, step, batch_size, seed)`` returns the batch of a
global step by random access into per-epoch permutations, so a run resumed at step k sees exactly the batches
an uninterrupted run sees. How rows are made (reading text, tokenizing, packing) is the application's business
(``oftjax.data``); the training loop needs only this.

Example:
    >>> import numpy as np
    >>> data = PackedData(np.arange(12, dtype=np.int32).reshape(6, 2), np.ones((6, 2), bool))
    >>> batch_at(data, 0, 2)["input_ids"].shape, num_batches_per_epoch(data, 4)
    ((2, 2), 1)
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["PackedData", "batch_at", "batch_rows", "num_batches_per_epoch"]


@dataclasses.dataclass(frozen=True)
class PackedData:
    """Fixed-length rows: ``input_ids`` int32 ``[N, T]``, ``loss_mask`` bool ``[N, T]`` (False on padding),
    and for rows holding several whole examples ``segment_ids`` int32 ``[N, T]`` (the example of each token,
    from 1; 0 on padding), which the train step turns into an attention mask and positions restarting per
    example (``oftjax.data.pack_examples``). None: each row is one sequence.

    ``trim_bucket``: when set, a batch keeps only its first columns, up to its rows' last loss token rounded
    up to a multiple of ``trim_bucket`` (at most ``seq_len``): padding after the last target changes neither
    the loss nor the gradients (causal attention: no position sees a later one), so batches of short rows
    run shorter, at one compilation per width.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray | None = None
    trim_bucket: int | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-row arrays a batch takes rows of, by batch key."""
        out = {"input_ids": self.input_ids, "loss_mask": self.loss_mask}
        if self.segment_ids is not None:
            out["segment_ids"] = self.segment_ids
        return out

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def take(self, index: np.ndarray | slice) -> PackedData:
        seg = None if self.segment_ids is None else self.segment_ids[index]
        return PackedData(self.input_ids[index], self.loss_mask[index], seg, self.trim_bucket)

    def width(self, rows: np.ndarray | slice) -> int:
        """The columns a batch of ``rows`` keeps (``seq_len`` unless ``trim_bucket`` is set)."""
        if self.trim_bucket is None:
            return self.seq_len
        mask = self.loss_mask[rows]
        last = int(np.max(np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 1)))
        return min(self.seq_len, -(-last // self.trim_bucket) * self.trim_bucket)

    def batch(self, rows: np.ndarray | slice) -> dict[str, np.ndarray]:
        """The arrays of ``rows``, cut to ``width(rows)`` columns."""
        width = self.width(rows)
        return {k: a[rows, :width] for k, a in self.arrays().items()}


def num_batches_per_epoch(data: PackedData, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch of an epoch is dropped)."""
    return len(data) // batch_size


def batch_rows(num_rows: int, step: int, batch_size: int, *, seed: int = 0) -> np.ndarray:
    """The row indices (sorted) of global step ``step``'s batch: a slice of a seeded per-epoch permutation.

    Every process of a multi-process run computes the same indices and reads only the rows its devices
    hold (``oftjax.train.global_batch``).

    Raises:
        ValueError: fewer rows than ``batch_size``.
    """
    per_epoch = num_rows // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"batch size {batch_size} exceeds the {num_rows} packed rows; "
            "use more data, a shorter --seq-len or a smaller --batch-size"
        )
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return np.sort(perm[k * batch_size : (k + 1) * batch_size])


def batch_at(data: PackedData, step: int, batch_size: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The batch of global step ``step``: the rows ``batch_rows`` picks, by random access.

    Returns ``{"input_ids": int32 [B, T], "loss_mask": bool [B, T]}``, and ``"segment_ids"`` for packed
    examples (``T`` cut by ``PackedData.trim_bucket`` when set).

    Raises:
        ValueError: fewer rows than ``batch_size``.
    """
    if len(data) < batch_size:
        raise ValueError(
            f"batch size {batch_size} exceeds the {len(data)} packed rows of length {data.seq_len}; "
            "use more data, a shorter --seq-len or a smaller --batch-size"
        )
    idx = batch_rows(len(data), step, batch_size, seed=seed)
    return data.batch(idx)
