"""Linear8bit / Linear4bit: dequantize-then-matmul forward, state layout, trainability, jit; Linear8bit's
LLM.int8 mode (how it is chosen, its gradient, OFT over it)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from oftjax import quant
from oftjax.nn import AdapterSettings, Linear4bit, Linear8bit, OFTLinear, OFTParam, QuantWeight
from oftjax.nn._forward import rotate_chain
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
    """W_cd = RNE_cd(code[q] * absmax_fp32), x cast to cd, result cast back to x.dtype
    (docs/bitsandbytes-formats.md, "What the forward passes compute")."""
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


# Linear8bit's two forwards (LLM.int8 against bitsandbytes: tests/parity/test_int8_eval_parity.py)


def _int8(threshold=6.0, **kw):
    return Linear8bit(
        make_base("int8", 64, 8).weight.get_value(), rand((8,), seed=5), threshold=threshold, **kw
    )


def _outlier_input():
    return rand((3, 64), seed=6).at[:, 7].set(9.0)


def test_int8_mode_follows_eval_and_train():
    layer = _int8()
    x = _outlier_input()
    assert (layer.int8_matmul, layer.deterministic, layer.uses_llm_int8) == ("auto", False, False)
    dense = layer(x)
    want = quant.llm_int8_matmul(x, layer.weight.get_value(), layer.bias[...], threshold=6.0)
    layer.eval()
    assert layer.uses_llm_int8 and layer.quantizes_input
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(want))
    layer.train()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(dense))
    assert not np.array_equal(np.asarray(dense), np.asarray(want))


@pytest.mark.parametrize("mode", ["dequantize", "llm_int8"])
def test_int8_mode_attribute_overrides_the_flag(mode):
    layer = _int8(int8_matmul=mode)
    for deterministic in (False, True):
        layer.deterministic = deterministic
        assert layer.uses_llm_int8 == (mode == "llm_int8")
        assert nnx.view(layer, int8_matmul="auto").uses_llm_int8 == deterministic
    assert layer.int8_matmul == mode  # a view leaves the layer as it was


def test_each_int8_mode_compiles_once():
    layer = _int8()
    f = nnx.jit(lambda m, x: m(x))
    views = [layer, nnx.view(layer, deterministic=True)]
    for v in views:
        f(v, rand((2, 64)))
    with COMPILES.counting() as c:
        for v in views:
            f(v, rand((2, 64), seed=1))
    assert c.count == 0


def test_llm_int8_mode_has_the_straight_through_gradient():
    layer = _int8(int8_matmul="llm_int8")
    x = _outlier_input()
    g = jax.grad(lambda x: layer(x).sum())(x)
    w = quant.dequantize(layer.weight.get_value(), jnp.float32)
    tol = TOL["fp32_forward"]
    np.testing.assert_allclose(np.asarray(g), np.asarray(jnp.ones((3, 8)) @ w), rtol=tol.rtol, atol=tol.atol)
    grads = nnx.grad(lambda m: m(x).sum())(layer)
    np.testing.assert_allclose(np.asarray(grads["bias"][...]), np.full(8, 3.0), rtol=tol.rtol)


def test_oft_over_llm_int8_rotates_the_input_not_the_weight():
    layer = OFTLinear(_int8(), rotate="weight")
    layer.add_adapter("a", AdapterSettings(r=4, block_size=16), init_weights=False, rngs=nnx.Rngs(0))
    x = _outlier_input()
    names = layer.forward_adapters()
    assert layer.uses_weight_path(x.shape, names)
    layer.eval()
    assert not layer.uses_weight_path(x.shape, names)
    R = layer.rotation_blocks("a")
    want = layer.base_layer(rotate_chain(x, (R,)).astype(x.dtype))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(layer, x)), np.asarray(want))
    with pytest.raises(ValueError, match="rotate the input"):
        layer.base_layer.rotated_forward(x, (R,))


BAD_INT8 = [
    ("mode", dict(int8_matmul="int4"), "int8_matmul must be one of"),
    ("threshold", dict(threshold=-1.0), "threshold must be a finite number >= 0"),
    ("threshold-inf", dict(threshold=float("inf")), "threshold must be a finite number >= 0"),
    ("rounding", dict(rounding="tpu"), "rounding must be one of"),
]


@pytest.mark.parametrize("name,kw,msg", BAD_INT8, ids=[b[0] for b in BAD_INT8])
def test_int8_options_are_checked(name, kw, msg):
    with pytest.raises(ValueError, match=msg):
        _int8(**kw)


def test_int8_mode_set_later_is_checked_when_used():
    layer = _int8()
    layer.int8_matmul = "fast"
    with pytest.raises(ValueError, match="int8_matmul must be one of"):
        layer(rand((1, 64)))
