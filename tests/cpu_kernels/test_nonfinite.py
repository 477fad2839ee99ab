"""Non-finite inputs: the CPU kernels give NaN wherever the math, and the pure-JAX default, gives NaN.

A kernel that turned a NaN into a finite number (a ``max`` or a clamp that drops it) would hide a diverged
training step or a corrupt adapter: with an all-NaN ``oft_R`` the default path gives NaN logits and so must
the kernels. Every named operation with a kernel is run jitted with the kernels off and on, on inputs with
NaNs or infinities at chosen places. Elementwise operations must give the default's non-finite values at the
same places. Attention sums products over keys: a masked key contributes a zero probability, and both
implementations multiply some of those zeros into their sums (``0 * NaN`` is NaN), each in its own blocks, so
each may have NaN beyond the math's. There the rule is: every value the math makes non-finite (a float64
reference that skips masked pairs) is non-finite on both paths, NaN where the math's is NaN; values finite on
all three agree.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oftjax.models
import oftjax.nn  # noqa: F401  (with oftjax.models: declares every named operation)
from oftjax import _registry, cpu_kernels, quant
from oftjax.cpu_kernels import _attention
from tests._tiny import TINY_LLAMA
from tests.cpu_kernels._helpers import require_loaded, skip_without_avx512

pytestmark = skip_without_avx512(_attention.supports(64, np.float32), "tests/models/test_attention_blocks.py")


@pytest.fixture(autouse=True)
def _loaded():
    require_loaded(_attention.LIBRARY)


def named(name: str):
    """The dispatching function of operation ``name`` (what the library calls)."""
    fn = _registry.default(name)
    return getattr(sys.modules[fn.__module__], fn.__name__)


def both(f, *args):
    """``jax.jit(f)(*args)`` with the kernels off, then on (each traced afresh), as float64 numpy."""
    out = []
    for switch in (cpu_kernels.disable, cpu_kernels.enable):  # each switches on call: call it here
        with switch():
            jax.clear_caches()
            out.append(jax.tree.map(lambda x: np.asarray(x, np.float64), jax.jit(f)(*args)))
    jax.clear_caches()
    return out


def assert_same_nonfinite(default, kernel):
    for d, k in zip(jax.tree.leaves(default), jax.tree.leaves(kernel), strict=True):
        assert np.isnan(d).any() or np.isinf(d).any(), "the case must produce non-finite values"
        np.testing.assert_array_equal(np.isnan(k), np.isnan(d), err_msg="NaN positions differ")
        np.testing.assert_array_equal(np.isposinf(k), np.isposinf(d), err_msg="+inf positions differ")
        np.testing.assert_array_equal(np.isneginf(k), np.isneginf(d), err_msg="-inf positions differ")
        finite = np.isfinite(d)
        scale = max(1.0, float(np.abs(d[finite]).max(initial=0)))
        np.testing.assert_allclose(k[finite], d[finite], rtol=1e-4, atol=1e-4 * scale)


def _qkv(seed=0, s=40, h=4, kv=2, d=64):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, s, h, d)).astype(np.float32)
    k = rng.normal(size=(2, s, kv, d)).astype(np.float32)
    v = rng.normal(size=(2, s, kv, d)).astype(np.float32)
    return q, k, v


ATTENTION_CASES = {
    "nan-query-row": ("q", (0, 5, 1, 3), np.nan),
    "nan-key-row": ("k", (1, 7, 0, 0), np.nan),
    "nan-value": ("v", (0, 3, 1, 10), np.nan),
    "all-nan-query": ("q", (slice(None),), np.nan),
    "inf-value": ("v", (0, 9, 0, 2), np.inf),
    "inf-key": ("k", (0, 2, 1, 5), np.inf),
    "nan-cotangent": ("w", (1, 4, 2, 7), np.nan),
}


def masked_reference(q, k, v, w, scale, window):
    """Attention and the gradients of ``sum(attention * w)`` in float64, every sum over the allowed (query,
    key) pairs only: non-finite exactly where the math is."""
    q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
    _, s, h, _ = q.shape
    g = h // k.shape[2]
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # [b, s, h, d]
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)  # [i, j]
    a4, a5 = allowed[None, None], allowed[None, None, :, :, None]

    def pairs(x, y):  # x [b, i, h, d], y [b, j, h, d] -> x_i * y_j, [b, h, i, j, d], zero where masked
        prod = x.transpose(0, 2, 1, 3)[:, :, :, None] * y.transpose(0, 2, 1, 3)[:, :, None]
        return np.where(a5, prod, 0.0)

    with np.errstate(invalid="ignore", over="ignore"):
        sc = pairs(q, kk).sum(-1) * scale
        m = np.where(a4, sc, -np.inf).max(-1, keepdims=True)
        e = np.where(a4, np.exp(sc - m), 0.0)
        p = np.where(a4, e / e.sum(-1, keepdims=True), 0.0)  # [b, h, i, j]
        o = np.where(a5, p[..., None] * vv.transpose(0, 2, 1, 3)[:, :, None], 0.0).sum(3)  # [b, h, i, d]
        dp = pairs(w, vv).sum(-1)
        delta = np.where(a4, p * dp, 0.0).sum(-1, keepdims=True)
        ds = np.where(a4, p * (dp - delta), 0.0)
        dq = np.where(a5, ds[..., None] * kk.transpose(0, 2, 1, 3)[:, :, None], 0.0).sum(3) * scale
        dkk = np.where(a5, ds[..., None] * q.transpose(0, 2, 1, 3)[:, :, :, None], 0.0).sum(2) * scale
        dvv = np.where(a5, p[..., None] * w.transpose(0, 2, 1, 3)[:, :, :, None], 0.0).sum(2)
    b, kvh, d = k.shape[0], k.shape[2], k.shape[3]

    def per_kv(x):  # [b, h, j, d] summed over each kv head's query heads -> [b, j, kv, d]
        return x.reshape(b, kvh, g, s, d).sum(2).transpose(0, 2, 1, 3)

    with np.errstate(invalid="ignore"):  # inf - inf in the sums: NaN, as in the math
        return o.transpose(0, 2, 1, 3), (dq.transpose(0, 2, 1, 3), per_kv(dkk), per_kv(dvv))


def assert_propagates(math, default, kernel, *, nan_exactly: bool):
    """Every value non-finite in ``math`` is non-finite on both paths (with ``nan_exactly``: NaN where the
    math's is NaN; an infinite input reaches NaN or an infinity by the order of the operations); the values
    finite on all three agree."""
    leaves = list(zip(jax.tree.leaves(math), jax.tree.leaves(default), jax.tree.leaves(kernel), strict=True))
    assert any(not np.isfinite(t).all() for t, _, _ in leaves), (
        "the case must make some of the math non-finite"
    )
    for t, d, k in leaves:
        for name, x in (("default", d), ("kernel", k)):
            hidden = ~np.isfinite(t) & np.isfinite(x)
            assert not hidden.any(), f"{name}: {hidden.sum()} finite value(s) where the math's is not"
            lost = np.isnan(t) & ~np.isnan(x)
            assert not (nan_exactly and lost.any()), (
                f"{name}: {lost.sum()} value(s) not NaN where the math's is"
            )
        finite = np.isfinite(t) & np.isfinite(d) & np.isfinite(k)
        scale = max(1.0, float(np.abs(d[finite]).max(initial=0)))
        np.testing.assert_allclose(k[finite], d[finite], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("case", list(ATTENTION_CASES), ids=list(ATTENTION_CASES))
@pytest.mark.parametrize("window", [None, 8], ids=["causal", "window"])
def test_attention_forward_and_backward_propagate_non_finite_values(case, window):
    q, k, v = _qkv()
    w = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
    which, where, value = ATTENTION_CASES[case]
    {"q": q, "k": k, "v": v, "w": w}[which][where] = value
    scale = 64**-0.5
    attention = named("causal_attention")

    def forward(q, k, v):
        return attention(q, k, v, None, None, scale=scale, window=window)

    o, grads = masked_reference(q, k, v, w, scale, window)
    nan_exactly = bool(np.isnan(value))
    if which != "w":
        assert_propagates(o, *both(forward, q, k, v), nan_exactly=nan_exactly)
    grad = jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v) * w), argnums=(0, 1, 2))
    assert_propagates(grads, *both(grad, q, k, v), nan_exactly=nan_exactly)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_swiglu_keeps_non_finite_values(value):
    rng = np.random.default_rng(3)
    gate, up = (rng.normal(size=(4, 96)).astype(np.float32) for _ in range(2))
    gate[0, :5] = value
    up[1, 7] = value
    gate[2, 3], up[2, 3] = value, 0.0
    assert_same_nonfinite(*both(named("swiglu"), gate, up))


@pytest.mark.parametrize("where", ["x", "R"])
def test_rotations_keep_nan(where):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 64)).astype(np.float32)
    R = rng.normal(size=(2, 32, 32)).astype(np.float32)
    if where == "x":
        x[1, 3] = np.nan
    else:
        R[1, 3, 4] = np.nan
    assert_same_nonfinite(*both(named("rotate_blocks"), x, R))
    vec = rng.normal(0, 0.1, size=(2, 32 * 31 // 2)).astype(np.float32)
    vec[1, 5] = np.nan
    assert_same_nonfinite(*both(lambda v: named("cayley_neumann_blocks")(v, 32, 5, False), vec))


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
def test_dequantize_keeps_a_nan_scale(nested):
    rng = np.random.default_rng(5)
    w = rng.normal(size=(64, 128)).astype(np.float32)
    q = quant.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
    field = "nested_absmax" if nested else "absmax"
    scales = np.asarray(getattr(q, field)).copy()
    scales[0 if nested else 3] = np.nan
    q = dataclasses.replace(q, **{field: scales})
    assert_same_nonfinite(*both(lambda q: named("dequantize_4bit")(q, jnp.float32), q))
    Rt = np.tile(np.eye(32, dtype=np.float32), (4, 1, 1))
    assert_same_nonfinite(*both(lambda q, r: named("dequantize_rotate")(q, r, jnp.float32), q, Rt))


def test_all_nan_adapter_gives_nan_logits_on_both_paths():
    """The reported case: a tiny Llama with an all-NaN ``oft_R`` (finite logits from the kernels before)."""
    from oftjax import OFTConfig, apply_oft
    from oftjax.models import LlamaForCausalLM, ModelConfig
    from oftjax.surgery import oft_layers

    model = LlamaForCausalLM(ModelConfig.from_hf({"model_type": "llama", **TINY_LLAMA}), rngs=nnx.Rngs(0))
    apply_oft(model, OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj"]), rngs=nnx.Rngs(1))
    for _, layer in oft_layers(model):
        for param in layer.rotation_params.values():
            param[...] = jnp.full(param[...].shape, jnp.nan, param[...].dtype)
    ids = jnp.asarray([[1, 5, 9, 3, 77, 2, 11, 4] * 4])
    default, kernel = both(lambda ids: model(ids), ids)
    assert np.isnan(default).all() and np.isnan(kernel).all()
