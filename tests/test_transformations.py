"""Every JAX transformation works through the OFT layers and a whole model, with the CPU kernels off and on.

``jax.jvp`` (forward mode), ``jax.grad``, ``jax.vmap``, ``jax.checkpoint`` and ``jax.jit`` through
``OFTLinear`` over float, int8 and 4-bit bases, and through ``LlamaForCausalLM`` with OFT on a 4-bit base;
the two implementations agree (kernels: float32 rounding). The forward-mode derivative is also checked
against a finite difference, so a wrong tangent rule cannot pass by agreeing with itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oftjax
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.nn import AdapterSettings, Linear4bit, Linear8bit, OFTLinear, OFTParam
from oftjax.train import quantize_model
from tests._tiny import TINY_LLAMA
from tests.tolerances import TOL

pytestmark = pytest.mark.usefixtures("kernels")


def _base(kind: str) -> nnx.Module:
    w = 0.05 * jax.random.normal(jax.random.key(0), (48, 64))
    if kind == "float":
        lin = nnx.Linear(64, 48, rngs=nnx.Rngs(0))
        lin.kernel[...] = w.T
        return lin
    if kind == "int8":
        return Linear8bit.from_float(w)
    return Linear4bit.from_float(w, quant_type="nf4", blocksize=64, compress_statistics=True)


def _layer(kind: str, rotate: str) -> OFTLinear:
    layer = OFTLinear(_base(kind), rotate=rotate)
    layer.add_adapter("a", AdapterSettings(r=4, block_size=16), init_weights=False, rngs=nnx.Rngs(1))
    layer.add_adapter("b", AdapterSettings(r=2, block_size=32), init_weights=False, rngs=nnx.Rngs(2))
    layer.set_active_adapters(["a", "b"])
    return layer


def _split_params(module):
    graphdef, params, rest = nnx.split(module, OFTParam, ...)
    return params, lambda p, *args: nnx.merge(graphdef, p, rest)(*args)


def _inner(a, b) -> float:
    return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=tol.rtol, atol=tol.atol * scale)


@pytest.mark.parametrize("rotate", ["input", "weight"])
@pytest.mark.parametrize("kind", ["float", "int8", "4bit"])
def test_oft_linear_under_every_transformation(kind, rotate):
    layer = _layer(kind, rotate)
    params, f = _split_params(layer)
    x = jax.random.normal(jax.random.key(3), (2, 40, 64))
    tangent = jax.tree.map(lambda p: jax.random.normal(jax.random.key(4), p.shape), params)
    y, t = jax.jit(lambda p, tp: jax.jvp(lambda q: f(q, x), (p,), (tp,)))(params, tangent)

    # forward mode agrees with a central difference along the tangent (float64-free: a loose budget)
    eps = 1e-3
    plus = f(jax.tree.map(lambda p, d: p + eps * d, params, tangent), x)
    minus = f(jax.tree.map(lambda p, d: p - eps * d, params, tangent), x)
    _close(t, (plus - minus) / (2 * eps), TOL["finite_difference"])

    # reverse mode: <grad, tangent> == the forward-mode derivative of the loss
    def loss(p):
        return jnp.sum(f(p, x) * y)

    g = jax.jit(jax.grad(loss))(params)
    lhs = sum(
        float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(tangent), strict=True)
    )
    rhs = float(jax.jvp(loss, (params,), (tangent,))[1])
    np.testing.assert_allclose(lhs, rhs, rtol=TOL["fp32_grad"].rtol)

    # checkpoint, vmap over a leading axis, and the plain forward agree
    g_remat = jax.jit(jax.grad(jax.checkpoint(loss)))(params)
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g), strict=True):
        _close(a, b, TOL["fp32_grad"])
    yv = jax.vmap(lambda xi: f(params, xi))(x)
    _close(yv, y, TOL["fp32_forward"])


def _model() -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf({**TINY_LLAMA, "model_type": "llama", "head_dim": 16})
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    quantize_model(model, "nf4", double_quant=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    oftjax.apply_oft(
        model,
        oftjax.OFTConfig(r=0, oft_block_size=16, target_modules=targets, init_weights=False),
        rngs=nnx.Rngs(1),
    )
    return model


def test_whole_model_jvp_grad_and_vmap():
    model = _model()
    params, f = _split_params(model)
    ids = jax.random.randint(jax.random.key(5), (2, 64), 0, TINY_LLAMA["vocab_size"])
    tangent = jax.tree.map(lambda p: jax.random.normal(jax.random.key(6), p.shape), params)
    logits, t = jax.jit(lambda p, tp: jax.jvp(lambda q: f(q, ids), (p,), (tp,)))(params, tangent)
    assert logits.shape == (2, 64, TINY_LLAMA["vocab_size"])

    eps = 1e-3
    plus = f(jax.tree.map(lambda p, d: p + eps * d, params, tangent), ids)
    minus = f(jax.tree.map(lambda p, d: p - eps * d, params, tangent), ids)
    _close(t, (plus - minus) / (2 * eps), TOL["finite_difference"])

    def loss(p):
        return jnp.mean(jax.nn.log_softmax(f(p, ids))[..., 0])

    g = jax.jit(jax.grad(loss))(params)
    lhs = sum(
        float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(tangent), strict=True)
    )
    rhs = float(jax.jit(lambda p, tp: jax.jvp(loss, (p,), (tp,))[1])(params, tangent))
    np.testing.assert_allclose(lhs, rhs, rtol=TOL["fp32_grad"].rtol)

    per_row = jax.vmap(lambda row: f(params, row[None])[0])(ids)
    _close(per_row, logits, TOL["fp32_forward"])


def test_tied_head_with_an_adapted_embedding():
    """The tied lm_head reads the base table also when ``embed_tokens`` is an OFT layer (PEFT: the rotation
    applies to the lookups only)."""
    cfg = ModelConfig.from_hf({**TINY_LLAMA, "model_type": "llama", "tie_word_embeddings": True})
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(7), (1, 16), 0, TINY_LLAMA["vocab_size"])
    before = model(ids)
    oftjax.apply_oft(model, oftjax.OFTConfig(r=0, oft_block_size=16, target_modules=["embed_tokens"]))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(before))  # identity at init
