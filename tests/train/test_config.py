"""TrainConfig validation, the warmup + cosine schedule, gradient clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oftjax.train import TrainConfig, make_optimizer, make_schedule


def test_schedule_warmup_then_cosine():
    s = make_schedule(TrainConfig(steps=100, learning_rate=2.0, warmup_steps=10, end_lr_ratio=0.1))
    lrs = np.array([float(s(i)) for i in range(101)])
    np.testing.assert_allclose(lrs[:11], np.linspace(0.0, 2.0, 11), rtol=1e-6)
    assert np.all(np.diff(lrs[10:]) <= 1e-7)  # non-increasing after warmup
    mid = 10 + 45
    np.testing.assert_allclose(lrs[mid], 0.2 + (2.0 - 0.2) * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
    np.testing.assert_allclose(lrs[100], 0.2, rtol=1e-6)


def test_default_warmup_is_five_percent():
    assert TrainConfig(steps=200).resolved_warmup == 10
    assert TrainConfig(steps=3).resolved_warmup == 1


def test_clipping_caps_global_norm():
    cfg = TrainConfig(steps=10, learning_rate=1.0, warmup_steps=0, max_grad_norm=1.0, b1=0.0, b2=0.0)
    tx = make_optimizer(cfg)
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    grads = {"a": jnp.full(3, 10.0), "b": jnp.full(2, -10.0)}
    state = tx.init(params)
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert abs(float(optax.global_norm(clipped)) - 1.0) < 1e-6
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction promotes its int count implicitly
        updates, _ = tx.update(grads, state, params)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in updates.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 6, "grad_accum": 4}, "divisible"),
        ({"seq_len": 1}, "seq_len"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"save_every": -1}, "save_every"),
    ],
    ids=["steps", "accum", "seq", "lr", "save"],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
