"""Linear8bit / Linear4bit: dequantize-then-matmul forward, state layout, trainability, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from oftjax import quant
from oftjax.nn import Linear4bit, Linear8bit, OFTParam, QuantWeight
from tests.nn._helpers import COMPILES, make_base, rand
from tests.tolerances import TOL

QUANT_BASES = ("int8", "nf4", "fp4", "nf4-dq")


@pytest.mark.parametrize("kind", QUANT_BASES, ids=QUANT_BASES)
def test_forward_is_dequantize_then_matmul(kind):
    layer = make_base(kind, 64, 24)
    x = rand((3, 5, 64))
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    w = np.asarray(quant.dequantize(layer.weight.get_value(), jnp.float32), np.float64)
    want = np.asarray(x, np.float64) @ w.T + np.asarray(layer.bias[...], np.float64)
    tol = TOL["fp32_forward"]
    np.testing.assert_allclose(np.asarray(y), want, rtol=tol.rtol, atol=tol.atol)
    assert y.shape == (3, 5, 24) and y.dtype == jnp.float32


@pytest.mark.parametrize("kind", ("int8", "nf4"), ids=("int8", "nf4"))
def test_compute_dtype_bf16_dequantizes_straight_into_compute_dtype(kind):
    """notes §7.1: W_cd = RNE_cd(code[q] * absmax_fp32), x cast to cd, result cast back to x.dtype."""
    layer = make_base(kind, 64, 8)
    layer.compute_dtype = jnp.dtype(jnp.bfloat16)
    x = rand((4, 64))
    y = layer(x)
    assert y.dtype == jnp.float32
    w = quant.dequantize(layer.weight.get_value(), jnp.bfloat16)
    want = (x.astype(jnp.bfloat16) @ w.T + layer.bias[...].astype(jnp.bfloat16)).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


def test_state_names_and_types():
    layer = make_base("nf4", 64, 8)
    state = nnx.state(layer)
    assert set(state.keys()) == {"weight", "bias"}
    assert isinstance(layer.weight, QuantWeight) and not isinstance(layer.weight, nnx.Param)
    assert (layer.in_features, layer.out_features) == (64, 8)


def test_quantized_weight_is_never_differentiated_or_updated():
    layer = make_base("int8", 64, 8)
    before = jax.tree.map(np.asarray, layer.weight.get_value())
    # nnx.Param selects the bias only: the integer arrays are not Params.
    grads = nnx.grad(lambda m, x: m(x).sum())(layer, rand((2, 64)))
    assert set(grads.keys()) == {"bias"}
    opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
    opt.update(layer, grads)
    after = layer.weight.get_value()
    np.testing.assert_array_equal(np.asarray(after.CB), before.CB)
    assert not nnx.state(layer, OFTParam)


def test_rejects_wrong_format_and_bias_shape():
    with pytest.raises(TypeError, match="Int8Weight"):
        Linear8bit(make_base("nf4", 64, 8).weight.get_value())
    with pytest.raises(TypeError, match="FourBitWeight"):
        Linear4bit(make_base("int8", 64, 8).weight.get_value())
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        Linear8bit(make_base("int8", 64, 8).weight.get_value(), jnp.zeros(3))


def test_second_jitted_call_compiles_nothing():
    layer = make_base("nf4-dq", 64, 8)
    f = nnx.jit(lambda m, x: m(x))
    f(layer, rand((2, 64)))
    with COMPILES.counting() as c:
        f(layer, rand((2, 64), seed=1))
    assert c.count == 0


def test_injectable_dot_general():
    calls = []

    def dot(*args, **kwargs):
        calls.append(1)
        return jax.lax.dot_general(*args, **kwargs)

    layer = Linear8bit(make_base("int8", 64, 8).weight.get_value(), dot_general=dot)
    layer(rand((1, 64)))
    assert calls


@pytest.mark.parametrize("kind", ("int8", "nf4", "fp4-dq"), ids=("int8", "nf4", "fp4-dq"))
def test_from_float_quantizes_like_quant(kind):
    w = rand((8, 64), seed=3)
    if kind == "int8":
        layer = Linear8bit.from_float(w)
        want = quant.quantize_int8(w)
    else:
        qt, _, dq = kind.partition("-")
        layer = Linear4bit.from_float(w, quant_type=qt, compress_statistics=dq == "dq")
        want = quant.quantize_4bit(w, quant_type=qt, compress_statistics=dq == "dq")
    for got, exp in zip(jax.tree.leaves(layer.weight.get_value()), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))
    assert layer.bias is None
