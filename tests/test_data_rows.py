"""Rows of examples for training: what is row data, held-out examples, padded rows, packed rows (segment ids
and positions that keep each example to itself: the model's logits equal each example's alone)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oftjax.chat_data import ChatExample
from oftjax.data import is_row_data, pack_examples, padded_rows, segment_positions, split_examples
from oftjax.models import LlamaForCausalLM, ModelConfig, segment_mask
from tests._tiny import TINY_LLAMA
from tests.tolerances import TOL


def _example(n: int, start: int = 1) -> ChatExample:
    return ChatExample(np.arange(start, start + n, dtype=np.int32), np.ones(n, bool), f"rows.jsonl:{start}")


def test_is_row_data(tmp_path):
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "a.jsonl").write_text("{}\n")
    (tmp_path / "rows" / "b.json").write_text("[]")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text("{}\n")
    (tmp_path / "mixed" / "notes.txt").write_text("text")
    (tmp_path / "text.txt").write_text("text")
    assert is_row_data(tmp_path / "rows") and is_row_data(tmp_path / "rows" / "a.jsonl")
    assert not is_row_data(tmp_path / "mixed") and not is_row_data(tmp_path / "text.txt")


def test_split_examples_is_seeded_and_keeps_order():
    examples = [_example(3, i) for i in range(20)]
    train, held = split_examples(examples, 0.2, seed=3)
    assert len(held) == 4 and len(train) == 16
    assert sorted(e.source for e in train + held) == sorted(e.source for e in examples)
    order = [e.source for e in examples]
    assert [e.source for e in train] == sorted((e.source for e in train), key=order.index)  # original order
    assert [e.source for e in split_examples(examples, 0.2, seed=3)[1]] == [e.source for e in held]
    with pytest.raises(ValueError, match="too few"):
        split_examples(examples[:1], 0.5)


def test_padded_rows_one_example_per_row():
    rows = padded_rows([_example(3), _example(6, 10)], 4, pad_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 0], [10, 11, 12, 13]]
    assert rows.loss_mask.tolist() == [[True, True, True, False], [True] * 4]


def test_pack_examples_first_fit_masks_and_segments():
    examples = [_example(5, 1), _example(4, 10), _example(3, 20), _example(9, 30)]
    rows, seg = pack_examples(examples, 8, pad_id=0)
    # 5 fits row 0; 4 does not (5 + 4 > 8): row 1; 3 fits row 0; 9 is cut to 8: row 2
    assert rows.input_ids.tolist() == [
        [1, 2, 3, 4, 5, 20, 21, 22],
        [10, 11, 12, 13, 0, 0, 0, 0],
        [30, 31, 32, 33, 34, 35, 36, 37],
    ]
    assert seg.tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    # no example's first token is a target (its predecessor belongs to another example); padding never
    assert rows.loss_mask.astype(int).tolist() == [
        [0, 1, 1, 1, 1, 0, 1, 1],
        [0, 1, 1, 1, 0, 0, 0, 0],
        [0] + [1] * 7,
    ]
    assert segment_positions(seg).tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3, 0, 1, 2, 3],
        list(range(8)),
    ]


def test_packed_row_gives_each_example_its_own_logits():
    model = LlamaForCausalLM(ModelConfig.from_hf({"model_type": "llama", **TINY_LLAMA}), rngs=nnx.Rngs(0))
    examples = [_example(5, 3), _example(7, 40)]
    rows, seg = pack_examples(examples, 12, pad_id=0)
    assert rows.input_ids.shape == (1, 12)
    packed = model(
        jnp.asarray(rows.input_ids),
        attention_mask=segment_mask(jnp.asarray(seg)),
        positions=jnp.asarray(segment_positions(seg)),
    )
    for k, e in enumerate(examples, 1):
        alone = model(jnp.asarray(e.input_ids)[None])
        tol = TOL["fp32_forward"]  # the masked and the causal attention path sum in other orders
        np.testing.assert_allclose(
            np.asarray(packed[0, seg[0] == k]), np.asarray(alone[0]), rtol=tol.rtol, atol=tol.atol
        )


def test_a_packed_batch_trains_on_what_its_examples_alone_give():
    """The train step on packed rows (``segment_ids`` in the batch: mask and positions made in the step)
    has the loss of the same examples one per padded row, and the same gradients (same tokens in the loss)."""
    from oftjax.train import TrainConfig, Trainer, batch_at, eval_batches

    model = LlamaForCausalLM(ModelConfig.from_hf({"model_type": "llama", **TINY_LLAMA}), rngs=nnx.Rngs(0))
    examples = [_example(5, 3), _example(7, 40), _example(4, 80), _example(9, 100)]
    packed, _ = pack_examples(examples, 12, pad_id=0)
    padded = padded_rows(examples, 12, pad_id=0)
    # pack_examples clears each example's first target; padded rows never predict their first token either
    assert packed.segment_ids is not None and len(packed) < len(padded)
    assert batch_at(packed, 0, len(packed))["segment_ids"].shape == packed.input_ids.shape
    cfg = TrainConfig(steps=1, seq_len=12, eval_batches=4)

    def loss(data) -> float:
        one_batch = dataclasses.replace(cfg, batch_size=len(data))
        return Trainer(model, one_batch, wrt=nnx.Param).eval_loss(eval_batches(data, one_batch))

    tol = TOL["fp32_forward"]  # the masked and the causal attention path sum in other orders
    np.testing.assert_allclose(loss(packed), loss(padded), rtol=tol.rtol)
    # without the segment ids the examples would see each other: the test can fail
    assert abs(loss(dataclasses.replace(packed, segment_ids=None)) - loss(padded)) > 1e-3


def test_per_batch_padding_cuts_a_batch_after_its_last_target_and_keeps_its_loss():
    """``trim_bucket``: a batch keeps its columns up to its last loss token rounded up to the bucket; the
    loss is the one of the full rows (what follows the last target changes nothing)."""
    from oftjax.train import TrainConfig, Trainer, batch_at, eval_batches

    model = LlamaForCausalLM(ModelConfig.from_hf({"model_type": "llama", **TINY_LLAMA}), rngs=nnx.Rngs(0))
    examples = [_example(5, 3), _example(7, 40), _example(13, 60), _example(3, 100)]
    full = padded_rows(examples, 32, pad_id=0)
    cut = padded_rows(examples, 32, pad_id=0, trim_bucket=4)
    assert cut.width(np.array([0, 1])) == 8 and cut.width(np.array([2, 3])) == 16 and full.width([0]) == 32
    assert batch_at(cut, 0, 2)["input_ids"].shape[1] in (8, 16)
    assert padded_rows(examples, 12, pad_id=0, trim_bucket=64).width(np.arange(4)) == 12  # at most seq_len
    cfg = TrainConfig(steps=1, seq_len=32, batch_size=2, eval_batches=2)
    batches = eval_batches(cut, cfg)
    assert [b["input_ids"].shape[1] for b in batches] == [8, 16]
    trainer = Trainer(model, cfg, wrt=nnx.Param)
    tol = TOL["fp32_forward"]
    want = trainer.eval_loss(eval_batches(full, cfg))
    np.testing.assert_allclose(trainer.eval_loss(batches), want, rtol=tol.rtol)
