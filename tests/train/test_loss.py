"""Causal-LM loss: shifted labels, masking, fp32 log-softmax; jitted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax.train import causal_lm_loss, causal_lm_loss_sum, head_chunk_rows, head_loss_sum
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


def _unfused(h, table, ids, mask, softcap):
    logits = h @ table.astype(h.dtype).T
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    return causal_lm_loss_sum(logits, ids, mask)


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk_rows", [None, 16, 13, 1000], ids=["default", "16", "13-padded", "one-chunk"])
def test_head_loss_equals_logits_loss_value_and_grads(softcap, chunk_rows):
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(3, 29, 8)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 50, size=(3, 29)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 29)) > 0.3)

    def fused(h, table):
        return head_loss_sum(h, table, ids, mask, softcap=softcap, chunk_rows=chunk_rows)

    ref, ref_n = _unfused(h, table, ids, mask, softcap)
    got, got_n = jax.jit(fused)(h, table)
    tol = TOL["fused_head_loss"]
    np.testing.assert_allclose(float(got), float(ref), rtol=tol.rtol)
    assert float(got_n) == float(ref_n)
    ref_g = jax.grad(lambda *a: _unfused(*a, ids, mask, softcap)[0], (0, 1))(h, table)
    got_g = jax.jit(jax.grad(lambda *a: fused(*a)[0], (0, 1)))(h, table)
    for r, g in zip(ref_g, got_g, strict=True):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(r), rtol=tol.rtol, atol=tol.atol * float(jnp.max(jnp.abs(r)))
        )
    # a frozen table (differentiated for the hidden states only): the same hidden-state gradient
    got_h = jax.jit(jax.grad(lambda h: fused(h, table)[0]))(h)
    np.testing.assert_allclose(
        np.asarray(got_h),
        np.asarray(ref_g[0]),
        rtol=tol.rtol,
        atol=tol.atol * float(jnp.max(jnp.abs(ref_g[0]))),
    )


def test_head_loss_without_mask_counts_every_target_and_scales_with_the_cotangent():
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 7, size=(2, 9)), jnp.int32)
    total, count = head_loss_sum(h, table, ids)
    assert float(count) == 2 * 8
    ref, _ = _unfused(h, table, ids, None, None)
    tol = TOL["fused_head_loss"]
    np.testing.assert_allclose(float(total), float(ref), rtol=tol.rtol)
    g3 = jax.grad(lambda h: 3.0 * head_loss_sum(h, table, ids, chunk_rows=4)[0])(h)
    g1 = jax.grad(lambda h: _unfused(h, table, ids, None, None)[0])(h)
    np.testing.assert_allclose(np.asarray(g3), 3.0 * np.asarray(g1), rtol=tol.rtol, atol=tol.atol)


def test_head_loss_bf16_hidden_matches_the_bf16_logits_loss():
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.bfloat16)
    table = jnp.asarray(
        rng.normal(size=(40, 8)), jnp.float32
    )  # cast to the hidden states' dtype, as the head
    ids = jnp.asarray(rng.integers(0, 40, size=(2, 16)), jnp.int32)
    got, _ = head_loss_sum(h, table, ids, chunk_rows=8)
    ref, _ = _unfused(h, table, ids, None, None)
    assert got.dtype == jnp.float32
    tol = TOL["bf16_forward"]  # bf16 logits of products accumulated per chunk vs at once, then rounded
    np.testing.assert_allclose(float(got), float(ref), rtol=tol.rtol)
    gh = jax.grad(lambda h: head_loss_sum(h, table, ids, chunk_rows=8)[0])(h)
    assert gh.dtype == jnp.bfloat16
    rh = np.asarray(jax.grad(lambda h: _unfused(h, table, ids, None, None)[0])(h), np.float32)
    tol = TOL["fused_head_grad_bf16"]
    atol = tol.atol * float(np.max(np.abs(rh)))
    np.testing.assert_allclose(np.asarray(gh, np.float32), rh, rtol=tol.rtol, atol=atol)


def test_head_loss_never_holds_the_logits():
    """The compiled gradient's temporaries stay far below one [positions, vocab] float32 array."""
    b, t, d, v = 8, 256, 64, 8192
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    table = jnp.zeros((v, d), jnp.float32)
    ids = jnp.zeros((b, t), jnp.int32)
    logits_bytes = b * t * v * 4
    fused = jax.jit(jax.grad(lambda h: head_loss_sum(h, table, ids, chunk_rows=128)[0])).lower(h).compile()
    unfused = jax.jit(jax.grad(lambda h: _unfused(h, table, ids, None, None)[0])).lower(h).compile()
    assert unfused.memory_analysis().temp_size_in_bytes >= logits_bytes  # what the fused loss avoids
    assert fused.memory_analysis().temp_size_in_bytes < logits_bytes / 4


def test_head_chunk_rows():
    assert head_chunk_rows(49152, 1024) == 512  # 512 x 49,152 x 4 bytes = 96 MiB <= 128 MiB
    assert head_chunk_rows(2048, 1024) == 1024  # no more rows than there are
    assert head_chunk_rows(256000, 64) == 64
    assert head_chunk_rows(256000, 4096) == 128
    assert head_chunk_rows(10**8, 4096) == 16  # at least 16 rows per product
