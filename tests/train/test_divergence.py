"""fit's divergence guard: a non-finite loss or one far above its start stops the run, the last good
checkpoint and its adapter are kept, the bad steps stay in metrics.jsonl."""

import jax.numpy as jnp
import numpy as np
import pytest

from oftjax.data import ByteTokenizer, pack, split, tokenize
from oftjax.train import TrainConfig, fit, latest_checkpoint, read_metrics
from oftjax.train._loop import TrainingDiverged, _Guard
from tests.train._tiny import TinyLM

TEXT = "def f(x):\n    return x * 2\n\n" * 40 + "class A:\n    pass\n" * 30


class FragileLM(TinyLM):
    """TinyLM whose forward is NaN once a rotation parameter leaves (-1, 1): a learning rate far too high
    drives it there in one Adam step (Adam moves each parameter by about the rate)."""

    def __call__(self, input_ids):
        h = self.embed(input_ids) * jnp.sqrt(1.0 - self.scale[...] ** 2)
        return self.head(jnp.tanh(self.proj(h)))


@pytest.fixture(scope="module")
def data():
    tok = ByteTokenizer()
    packed = pack(tokenize([TEXT], tok), 16, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return split(packed, 0.1, seed=0)


def _write_adapter(model, path):
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "scale.npy", np.asarray(model.scale[...]))


def _cfg(**kw):
    base = dict(steps=8, learning_rate=1e-3, warmup_steps=0, batch_size=4, seq_len=16, save_every=2)
    return TrainConfig(**{**base, **kw})


def test_nan_loss_keeps_the_last_good_checkpoint_and_adapter(tmp_path, data):
    train, evald = data
    kw = dict(eval_data=evald, output_dir=tmp_path, write_adapter=_write_adapter, progress=False)
    fit(FragileLM(vocab=259), _cfg(log_every=1), train, stop_after=4, **kw)  # good checkpoints 2 and 4
    good_scale = np.load(tmp_path / "checkpoints" / "step_00000004" / "adapter" / "scale.npy")
    # resumed at a rate that breaks the model on the next update: step 5's loss is finite, step 6's is NaN
    with pytest.raises(TrainingDiverged, match=r"step 6: the loss is nan") as e:
        fit(FragileLM(vocab=259), _cfg(learning_rate=5.0, log_every=1), train, resume=True, **kw)
    message = str(e.value)
    assert "kept the last good checkpoint" in message and "step_00000004" in message
    assert "Lower the learning rate" in message
    assert e.value.step == 6 and e.value.checkpoint.name == "step_00000004"
    # checkpoint 5 would hold the parameters that gave step 6's NaN (none was due; none exists)
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    np.testing.assert_array_equal(np.load(tmp_path / "adapter" / "scale.npy"), good_scale)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and np.isnan(recs[-1]["loss"])


def test_divergence_before_any_checkpoint_writes_no_adapter(tmp_path, data):
    train, _ = data
    with pytest.raises(TrainingDiverged, match="no checkpoint was saved before it") as e:
        fit(
            FragileLM(vocab=259),
            _cfg(learning_rate=5.0, log_every=1, save_every=1),
            train,
            output_dir=tmp_path,
            write_adapter=_write_adapter,
            progress=False,
        )
    assert e.value.step == 2 and e.value.checkpoint is None
    # checkpoint 1 was written (step 1's loss was fine) but its parameters gave step 2's NaN: removed
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "adapter").exists()


def test_the_guard_compares_smoothed_losses_with_the_start():
    guard = _Guard(2.0)
    # a noisy but healthy run: single losses above 2x the first one do not trigger (the means do not)
    guard.check([{"step": i + 1, "loss": x} for i, x in enumerate([1.0, 3.0, 2.0, 4.0, 1.5, 2.5])])
    rising = _Guard(2.0)
    with pytest.raises(
        TrainingDiverged, match=r"step 6: the loss \(mean of the last 3 steps\) rose to 10\.667, more than 2x"
    ):
        rising.check([{"step": i + 1, "loss": x} for i, x in enumerate([4.8, 5.0, 5.2, 9.0, 11.0, 12.0])])


def test_the_guard_can_be_switched_off(tmp_path, data):
    train, _ = data
    res = fit(
        FragileLM(vocab=259),
        _cfg(learning_rate=5.0, steps=3),
        train,
        output_dir=tmp_path,
        progress=False,
        divergence_factor=None,
    )
    assert np.isnan(res.records[-1]["loss"])
