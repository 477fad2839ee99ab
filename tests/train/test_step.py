"""The jitted train step: accumulation == one big batch, only OFT params change, one compilation, sharding."""

import jax
import numpy as np
import pytest
from flax import nnx

from oftjax.nn import OFTParam
from oftjax.train import TrainConfig, Trainer, make_mesh
from tests.tolerances import TOL
from tests.train._tiny import TinyLM, random_batch

# layer, model and training parity: with the pure-JAX default and with the CPU kernels (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernels")


def _cfg(**kw):
    base = dict(steps=10, learning_rate=1e-2, warmup_steps=1, batch_size=8, seq_len=12)
    base.update(kw)
    return TrainConfig(**base)


def _run(trainer, n=3):
    return [float(trainer.train_step(random_batch(seed=i))["loss"]) for i in range(n)]


@pytest.mark.parametrize("accum", [2, 4], ids=["k2", "k4"])
def test_grad_accumulation_equals_one_big_batch(accum):
    one = Trainer(TinyLM(), _cfg())
    many = Trainer(TinyLM(), _cfg(grad_accum=accum))
    tol = TOL["grad_accum"]
    np.testing.assert_allclose(_run(many), _run(one), rtol=tol.rtol, atol=tol.atol)
    np.testing.assert_allclose(
        np.asarray(many.model.scale[...]), np.asarray(one.model.scale[...]), rtol=tol.rtol, atol=tol.atol
    )


def test_only_oft_params_change():
    model = TinyLM()
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(OFTParam)))
    oft_before = np.asarray(model.scale[...])
    trainer = Trainer(model, _cfg())
    losses = _run(trainer)
    after = jax.tree.map(np.asarray, nnx.state(trainer.model, nnx.Not(OFTParam)))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert not np.array_equal(np.asarray(trainer.model.scale[...]), oft_before)
    assert losses[-1] < losses[0]
    assert trainer.step == 3


def test_second_step_does_not_recompile():
    trainer = Trainer(TinyLM(), _cfg())
    trainer.train_step(random_batch(seed=0))
    assert trainer._train._cache_size() == 1
    with jax.log_compiles(True):
        trainer.train_step(random_batch(seed=1))
        trainer.train_step(random_batch(seed=2))
    assert trainer._train._cache_size() == 1


def test_state_is_donated():
    trainer = Trainer(TinyLM(), _cfg())
    old = trainer.state
    trainer.train_step(random_batch(seed=0))
    leaf = jax.tree.leaves(old)[0]
    assert leaf.is_deleted()


def test_no_trainable_variables_is_an_error():
    with pytest.raises(ValueError, match="no trainable variables"):
        Trainer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), _cfg())


def test_eval_loss_does_not_change_state():
    trainer = Trainer(TinyLM(), _cfg())
    before = np.asarray(trainer.model.scale[...])
    loss = trainer.eval_loss([random_batch(seed=5)])
    assert np.isfinite(loss)
    np.testing.assert_array_equal(np.asarray(trainer.model.scale[...]), before)


@pytest.mark.parametrize("data, fsdp", [(8, 1), (2, 4), (1, 8)], ids=["dp8", "dp2-fsdp4", "fsdp8"])
def test_sharded_step_equals_single_device(data, fsdp):
    assert len(jax.devices()) == 8, "tests/conftest.py forces 8 host devices"
    single = Trainer(TinyLM(), _cfg())
    mesh = make_mesh(data=data, fsdp=fsdp)
    sharded = Trainer(TinyLM(), _cfg(), mesh=mesh)
    kernel = sharded.state[0]["proj"]["kernel"].get_value()
    if fsdp > 1:
        assert kernel.sharding.spec[0] == "fsdp"  # the NNX metadata was honoured
    tol = TOL["sharded_step"]
    np.testing.assert_allclose(_run(sharded), _run(single), rtol=tol.rtol, atol=tol.atol)
    np.testing.assert_allclose(
        np.asarray(sharded.model.scale[...]),
        np.asarray(single.model.scale[...]),
        rtol=tol.rtol,
        atol=tol.atol,
    )
