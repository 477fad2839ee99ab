"""Causal-LM loss: shifted labels, masking, fp32 log-softmax; jitted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax.train import causal_lm_loss, causal_lm_loss_sum
from tests.tolerances import TOL


def _reference(logits, ids, mask):
    lg = logits[:, :-1].astype(np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    m = mask[:, 1:].astype(np.float64)
    return (nll * m).sum() / m.sum()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_matches_numpy_reference_jitted(dtype):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    ids = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    mask = rng.random((3, 7)) > 0.3
    got = jax.jit(causal_lm_loss)(jnp.asarray(logits, dtype), ids, mask)
    assert got.dtype == jnp.float32
    ref = _reference(np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32)), ids, mask)
    tol = TOL["fp32_forward"]
    np.testing.assert_allclose(float(got), ref, rtol=tol.rtol, atol=tol.atol)


def test_masked_targets_do_not_count():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
    ids = rng.integers(0, 5, size=(2, 6)).astype(np.int32)
    mask = np.ones((2, 6), bool)
    mask[0, 4:] = False  # targets at positions 4, 5 of row 0 -> predictions from positions 3, 4
    base = causal_lm_loss(logits, ids, mask)
    changed = logits.copy()
    changed[0, 3:5] += 100.0 * rng.normal(size=(2, 5)).astype(np.float32)
    changed[0, 5] += 7.0  # the last position never predicts anything
    np.testing.assert_array_equal(np.asarray(causal_lm_loss(changed, ids, mask)), np.asarray(base))
    _, count = causal_lm_loss_sum(logits, ids, mask)
    assert float(count) == 5 + 3


def test_all_masked_is_zero_not_nan():
    logits = jnp.zeros((1, 4, 3))
    loss = causal_lm_loss(logits, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), bool))
    assert float(loss) == 0.0
