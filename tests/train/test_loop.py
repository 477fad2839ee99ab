"""fit(): metrics.jsonl, loss.png, checkpoints, and resume == uninterrupted (bitwise on one CPU)."""

import json

import numpy as np
import pytest

from oftjax.data import ByteTokenizer, pack, split, tokenize
from oftjax.train import TrainConfig, fit, latest_checkpoint, read_metrics, restore_train_state
from tests.train._tiny import TinyLM

TEXT = "def f(x):\n    return x * 2\n\n" * 40 + "class A:\n    pass\n" * 30


@pytest.fixture(scope="module")
def data():
    tok = ByteTokenizer()
    packed = pack(
        tokenize([TEXT, TEXT[::-1]], tok), 16, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id
    )
    return split(packed, 0.1, seed=0)


def _cfg(**kw):
    base = dict(steps=6, learning_rate=3e-2, batch_size=4, seq_len=16, save_every=3, eval_every=3)
    base.update(kw)
    return TrainConfig(**base)


def _write_adapter(model, path):
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "scale.npy", np.asarray(model.scale[...]))


def test_fit_writes_metrics_plot_checkpoints(tmp_path, data):
    train, evald = data
    res = fit(
        TinyLM(vocab=259),
        _cfg(),
        train,
        eval_data=evald,
        output_dir=tmp_path,
        write_adapter=_write_adapter,
        progress=False,
    )
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= r.keys() for r in recs)
    assert "eval_loss" in recs[2] and "eval_loss" in recs[5]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "adapter" / "scale.npy").is_file()
    ck = latest_checkpoint(tmp_path)
    assert ck.name == "step_00000006" and (ck / "adapter" / "scale.npy").is_file()
    meta = json.loads((ck / "trainer.json").read_text())
    assert meta["step"] == 6 and meta["config"]["learning_rate"] == 3e-2
    assert res.eval_loss_after < res.eval_loss_before


def test_resume_equals_uninterrupted_bitwise(tmp_path, data):
    train, _ = data
    full = fit(TinyLM(vocab=259), _cfg(), train, output_dir=tmp_path / "a", progress=False)
    part = fit(TinyLM(vocab=259), _cfg(), train, output_dir=tmp_path / "b", progress=False, stop_after=3)
    assert [r["step"] for r in part.records] == [1, 2, 3]
    # a fresh process would rebuild the model from scratch: the trained values come from the checkpoint
    rest = fit(TinyLM(vocab=259), _cfg(), train, output_dir=tmp_path / "b", progress=False, resume=True)
    assert rest.start_step == 3
    full_losses = [r["loss"] for r in full.records]
    resumed = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert resumed == full_losses  # bitwise: same compiled step, same inputs, same state
    np.testing.assert_array_equal(np.asarray(rest.model.scale[...]), np.asarray(full.model.scale[...]))


def test_restore_rejects_other_model(tmp_path, data):
    train, _ = data
    fit(TinyLM(vocab=259), _cfg(steps=1), train, output_dir=tmp_path, progress=False)
    from oftjax.train import Trainer

    other = Trainer(TinyLM(vocab=259, dim=8), _cfg())
    with pytest.raises(ValueError, match="train_state.safetensors.*(shape|missing)"):
        restore_train_state(latest_checkpoint(tmp_path), other.state, other.wrt)


class _HostSyncs:
    """Counts the times the host waits for device values: one per ``jax.device_get`` call (however many
    arrays it fetches), plus every read of a single array outside one (``float``, ``int``, ``bool``,
    formatting, ``.item()``, ``.tolist()``, ``block_until_ready``)."""

    _READS = ("_value", "item", "block_until_ready")

    def __init__(self, monkeypatch):
        import jax
        from jax._src.array import ArrayImpl

        self.count = 0
        self._inside = False
        get = jax.device_get

        def device_get(tree):
            self.count += 1
            self._inside = True
            try:
                return get(tree)
            finally:
                self._inside = False

        monkeypatch.setattr(jax, "device_get", device_get)
        for name in self._READS:
            monkeypatch.setattr(ArrayImpl, name, self._counted(ArrayImpl.__dict__[name]))

    def _counted(self, original):
        def count(array):
            if not self._inside:
                self.count += 1

        if isinstance(original, property):
            return property(lambda array: (count(array), original.fget(array))[1])
        return lambda array, *a, **kw: (count(array), original(array, *a, **kw))[1]


def test_the_counter_sees_single_reads(monkeypatch):
    import jax
    import jax.numpy as jnp

    x = jnp.ones(3).sum()
    syncs = _HostSyncs(monkeypatch)
    float(x), x.item(), f"{x:.1f}", x.block_until_ready(), jax.device_get([x, x, x])
    assert syncs.count == 5


@pytest.mark.parametrize("log_every", [1, 8], ids=["every-step", "every-8"])
def test_fit_waits_for_the_device_once_per_window(tmp_path, data, monkeypatch, log_every):
    train, evald = data
    cfg = _cfg(steps=24, log_every=log_every, save_every=0, eval_every=12, eval_batches=2)
    model = TinyLM(vocab=259)
    syncs = _HostSyncs(monkeypatch)
    res = fit(model, cfg, train, eval_data=evald, output_dir=tmp_path, progress=False)
    # three evaluations (before, after steps 12 and 24; one fetch each) and the final checkpoint (one fetch);
    # the rest are metric windows: after step 1 (its compilation timed alone), at every multiple of
    # log_every, and at the evaluation of step 12
    windows = len({1, 12, *range(log_every, 25, log_every)})
    assert syncs.count == windows + 3 + 1
    if log_every == 8:
        assert windows == 5  # 24 steps, O(steps / log_every) waits
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 25)) == [r["step"] for r in res.records]
    assert all(np.isfinite([r["loss"], r["lr"], r["grad_norm"], r["tokens_per_s"]]).all() for r in recs)
    # throughput is per window: steps 2..8 share one figure
    if log_every == 8:
        assert len({r["tokens_per_s"] for r in recs[1:8]}) == 1
    assert "eval_loss" in recs[11] and "eval_loss" in recs[23]
    # the logged learning rate is the schedule's at each step (computed inside the step)
    from oftjax.train import make_schedule

    schedule = make_schedule(cfg)
    np.testing.assert_allclose([r["lr"] for r in recs], [float(schedule(s)) for s in range(24)], rtol=1e-6)
