"""The run both sides of the multi-process tests train: data, settings and adapter writer, in one place."""

from __future__ import annotations

import numpy as np

from oftjax.data import ByteTokenizer, pack, split, tokenize
from oftjax.train import TrainConfig

TEXT = "def f(x):\n    return x * 2\n\n" * 40 + "class A:\n    pass\n" * 30


def data():
    """(train, eval) packed rows of 16 byte tokens."""
    tok = ByteTokenizer()
    packed = pack(
        tokenize([TEXT, TEXT[::-1]], tok), 16, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id
    )
    return split(packed, 0.1, seed=0)


def config(**kw) -> TrainConfig:
    """6 steps of 8 rows (one per device of an 8-device mesh), checkpoints every 3, evaluations every 3."""
    base = dict(
        steps=6, learning_rate=3e-2, batch_size=8, seq_len=16, save_every=3, eval_every=3, eval_batches=2
    )
    base.update(kw)
    return TrainConfig(**base)


def write_adapter(model, path) -> None:
    """The "adapter" of TinyLM: its OFT vector, as .npy."""
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "scale.npy", np.asarray(model.scale[...]))
