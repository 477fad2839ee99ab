"""OFTLinear: identity at init, forward math, both rotation paths, COFT write-back, dropout, adapters, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from oftjax import oft
from oftjax.nn import AdapterSettings, OFTLinear, OFTParam, QuantWeight, base_ops
from oftjax.nn._forward import rotated_matmul
from oftjax.nn._merge import merge_layer
from tests.nn._helpers import BASES, COMPILES, make_base, rand
from tests.tolerances import TOL

FWD, GRAD, PATHS = TOL["fp32_forward"], TOL["fp32_grad"], TOL["rotate_paths"]


def _close_scaled(a, b, tol=PATHS):
    """Compare after scaling both by max|b|: cancellation makes single elements meaningless to rtol."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s = max(float(np.abs(b).max()), 1e-30)
    np.testing.assert_allclose(a / s, b / s, rtol=tol.rtol, atol=tol.atol)


def _dense_weight(layer):
    """Torch-layout [out, in] weight the base forward uses (compute dtype fp32)."""
    return np.asarray(base_ops(layer.base_layer).dense_weight(jnp.float32))


def _wrapped(kind, in_f=64, out_f=24, *settings, seed=0, rotate="auto"):
    return _wrapped_base(make_base(kind, in_f, out_f, seed=seed), rotate, *settings)


def _wrapped_base(base, rotate, *settings):
    layer = OFTLinear(base, rotate=rotate)
    for i, s in enumerate(settings):
        layer.add_adapter(f"a{i}", s, init_weights=False, rngs=nnx.Rngs(10 + i))
    return layer


IDENTITY_CASES = [(k, True) for k in BASES] + [("float", False), ("nf4", False)]


@pytest.mark.parametrize(
    ("kind", "jit"), IDENTITY_CASES, ids=[f"{k}-{'jit' if j else 'eager'}" for k, j in IDENTITY_CASES]
)
def test_identity_at_init_is_bit_exact(kind, jit):
    base = make_base(kind, 64, 24)
    x = rand((2, 3, 64))
    want = base(x)
    layer = OFTLinear(base)
    layer.add_adapter("default", AdapterSettings(r=4, block_size=16))
    layer.add_adapter("other", AdapterSettings(r=32, block_size=2, coft=True, eps=1e-3, block_share=True))
    layer.set_active_adapters(["default", "other"])
    got = nnx.jit(lambda m, x: m(x))(layer, x) if jit else layer(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("kind", BASES, ids=BASES)
def test_holds_base_with_its_state_names_below_base_layer(kind):
    base = make_base(kind, 64, 8)
    layer = OFTLinear(base)
    layer.add_adapter("default", AdapterSettings(r=2, block_size=32))
    base_names = set(nnx.state(base).keys())
    assert base_names == ({"kernel", "bias"} if kind == "float" else {"weight", "bias"})
    assert set(nnx.state(layer).keys()) == {"base_layer", "oft_R"}
    assert set(nnx.state(layer)["base_layer"].keys()) == base_names
    assert layer.oft_R["default"][...].shape == (2, 32 * 31 // 2)
    assert isinstance(layer.oft_R["default"], OFTParam)
    assert layer.base_layer is base  # held, not copied


def test_forward_matches_dense_chain_of_two_adapters():
    """y = x BD_a BD_b W^T + bias: several active adapters chain in order (non-commuting b >= 4)."""
    layer = _wrapped("float", 16, 5, AdapterSettings(r=4, block_size=4), AdapterSettings(r=2, block_size=8))
    layer.set_active_adapters(["a0", "a1"])
    x = rand((7, 16))
    BDa, BDb = (np.asarray(layer.delta_weight(n), np.float64) for n in ("a0", "a1"))
    W = _dense_weight(layer).astype(np.float64)
    want = np.asarray(x, np.float64) @ BDa @ BDb @ W.T + np.asarray(layer.base_layer.bias[...])
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=FWD.rtol, atol=FWD.atol)
    # the other order differs: the order is real.
    other = np.asarray(x, np.float64) @ BDb @ BDa @ W.T + np.asarray(layer.base_layer.bias[...])
    assert np.abs(other - want).max() > 1e-3


def test_delta_weight_is_block_diag_of_rotations():
    layer = _wrapped("float", 16, 5, AdapterSettings(r=4, block_size=4, use_cayley_neumann=False))
    R = layer.rotation_blocks("a0")
    D = np.asarray(layer.delta_weight("a0"))
    assert D.shape == (16, 16)
    np.testing.assert_array_equal(D, np.asarray(oft.block_diag(R)))
    ortho = TOL["oft_orthogonality_fp32"]
    np.testing.assert_allclose(D @ D.T, np.eye(16), rtol=ortho.rtol, atol=ortho.atol)  # exact Cayley


SETTINGS = {
    "one": (AdapterSettings(r=4, block_size=16),),
    "two": (
        AdapterSettings(r=4, block_size=16),
        AdapterSettings(r=16, block_size=4, use_cayley_neumann=False),
    ),
    "coft-share": (AdapterSettings(r=8, block_size=8, coft=True, eps=1e-2, block_share=True),),
}


PATH_CASES = [("float", "one"), ("int8", "two"), ("nf4-dq", "coft-share")]


@pytest.mark.parametrize(("kind", "name"), PATH_CASES, ids=[f"{k}-{n}" for k, n in PATH_CASES])
def test_weight_path_equals_input_path_values_and_grads(kind, name):
    x = rand((3, 5, 64), seed=4)

    def run(rotate):
        layer = _wrapped(kind, 64, 24, *SETTINGS[name], rotate=rotate)
        layer.set_active_adapters(list(layer.adapters))
        loss = lambda m, x: jnp.sum(jnp.sin(m(x)))  # noqa: E731
        y = nnx.jit(lambda m, x: m(x))(layer, x)
        g_params, g_x = nnx.jit(nnx.grad(loss, argnums=(nnx.DiffState(0, OFTParam), 1)))(layer, x)
        return y, g_params, g_x

    y_in, gp_in, gx_in = run("input")
    y_w, gp_w, gx_w = run("weight")
    _close_scaled(y_w, y_in)
    _close_scaled(gx_w, gx_in)
    for a, b in zip(jax.tree.leaves(gp_w), jax.tree.leaves(gp_in), strict=True):
        _close_scaled(a, b)


def test_auto_path_choice_from_static_shapes():
    layer = _wrapped("float", 64, 24, AdapterSettings(r=4, block_size=16))
    names = ("a0",)
    assert not layer.uses_weight_path((2, 8, 64), names)  # 16 tokens < d_out: rotate the inputs
    assert layer.uses_weight_path((4, 32, 64), names)  # 128 tokens > d_out: rotate the kernel
    layer.rotate = "input"
    assert not layer.uses_weight_path((4, 32, 64), names)


def test_coft_projects_on_forward_and_writes_back_with_straight_through_grad():
    s = AdapterSettings(r=4, block_size=4, coft=True, eps=1e-2)
    layer = _wrapped("float", 16, 3, s)
    raw = layer.oft_R["a0"][...]
    projected = oft.coft_project(raw, 1e-2)
    assert not np.allclose(np.asarray(raw), np.asarray(projected))  # N(0, 0.1) init is outside the ball
    x = rand((5, 16))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, OFTParam))(layer)
    np.testing.assert_array_equal(np.asarray(layer.oft_R["a0"][...]), np.asarray(projected))
    # Same gradient as a plain adapter sitting at the projected point (PEFT's in-place no_grad projection).
    plain = _wrapped("float", 16, 3, AdapterSettings(r=4, block_size=4))
    plain.base_layer.kernel[...] = layer.base_layer.kernel[...]
    plain.base_layer.bias[...] = layer.base_layer.bias[...]
    plain.oft_R["a0"][...] = projected
    g_plain = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, OFTParam))(plain)
    np.testing.assert_allclose(
        np.asarray(grads["oft_R"]["a0"][...]),
        np.asarray(g_plain["oft_R"]["a0"][...]),
        rtol=GRAD.rtol,
        atol=GRAD.atol,
    )


def test_coft_write_back_survives_jit():
    layer = _wrapped("float", 16, 3, AdapterSettings(r=4, block_size=4, coft=True, eps=1e-2))
    projected = oft.coft_project(layer.oft_R["a0"][...], 1e-2)
    nnx.jit(lambda m, x: m(x))(layer, rand((2, 16)))
    np.testing.assert_array_equal(np.asarray(layer.oft_R["a0"][...]), np.asarray(projected))


def test_module_dropout_in_training_only():
    s = AdapterSettings(r=8, block_size=4, module_dropout=0.5)
    layer = OFTLinear(make_base("float", 32, 6))
    layer.add_adapter("d", s, init_weights=False, rngs=nnx.Rngs(params=0, dropout=1))
    R_eval = layer.rotation_blocks("d")
    eye = np.eye(4, dtype=np.float32)
    seen = set()
    for _ in range(4):
        R = np.asarray(layer.rotation_blocks("d", training=True))
        dropped = [i for i in range(8) if np.array_equal(R[i], eye)]
        kept = [i for i in range(8) if i not in dropped]
        assert len(dropped) == int(0.5 * 8)
        np.testing.assert_array_equal(R[kept], np.asarray(R_eval)[kept])
        seen.add(tuple(dropped))
    assert len(seen) > 1  # fresh randomness per call
    x = rand((3, 32))
    y_train = layer(x)
    layer.eval()
    assert layer.deterministic
    y_eval = layer(x)
    assert not np.allclose(np.asarray(y_train), np.asarray(y_eval))
    np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(layer(x)))
    train_view = nnx.view(layer, deterministic=False)
    assert not np.allclose(np.asarray(train_view(x)), np.asarray(y_eval))


def test_module_dropout_needs_rngs_only_to_train():
    layer = OFTLinear(make_base("float", 32, 6))
    layer.add_adapter("d", AdapterSettings(r=8, block_size=4, module_dropout=0.5))  # e.g. a loaded adapter
    x = jnp.ones((2, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"needs randomness: call model.eval\(\) for inference"):
        layer(x)
    layer.eval()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(layer.base_layer(x)))  # identity init


def test_adapter_management():
    base = make_base("int8", 64, 8)
    layer = OFTLinear(base)
    x = rand((2, 64))
    layer.add_adapter("a", AdapterSettings(r=4, block_size=16), init_weights=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a", AdapterSettings(r=4, block_size=16))
    with pytest.raises(ValueError, match="do not tile in_features=64"):
        layer.add_adapter("bad", AdapterSettings(r=3, block_size=16))
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_active_adapters(["nope"])
    layer.add_adapter("b", AdapterSettings(r=2, block_size=32), init_weights=False, rngs=nnx.Rngs(1))
    assert layer.active_adapters == ("a", "b")
    y_ab = layer(x)
    with layer.disable_adapters():
        np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(base(x)))
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(y_ab))
    layer.set_active_adapters("a")
    y_a = layer(x)
    layer.delete_adapter("b")
    assert list(layer.adapters) == ["a"] and "b" not in layer.oft_R
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(y_a))
    with pytest.raises(TypeError, match="already an OFTLinear"):
        OFTLinear(layer)
    with pytest.raises(TypeError, match="OFT supports"):
        OFTLinear(nnx.LayerNorm(4, rngs=nnx.Rngs(0)))


def test_jitted_forward_and_grad_step_compile_once():
    layer = _wrapped("nf4", 64, 16, AdapterSettings(r=4, block_size=16, coft=True, eps=1e-2))
    opt = nnx.Optimizer(layer, optax.adamw(1e-3), wrt=OFTParam)

    @nnx.jit
    def step(m, opt, x):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, OFTParam))(m)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction promotes an int count
            opt.update(m, g)
        return loss

    fwd = nnx.jit(lambda m, x: m(x))
    step(layer, opt, rand((4, 64)))
    fwd(layer, rand((4, 64)))
    with COMPILES.counting() as c:
        step(layer, opt, rand((4, 64), seed=1))
        fwd(layer, rand((4, 64), seed=2))
    assert c.count == 0
    # Functional style too: jax.jit over the split state, cache size stays 1.
    graphdef, state = nnx.split(layer)
    f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    f(state, rand((4, 64)))
    f(state, rand((4, 64), seed=3))
    assert f._cache_size() == 1


def test_optimizer_updates_only_rotations():
    layer = _wrapped("nf4-dq", 64, 16, AdapterSettings(r=4, block_size=16))
    frozen = jax.tree.map(np.asarray, nnx.state(layer, nnx.Not(OFTParam)))
    before = np.asarray(layer.oft_R["a0"][...])
    opt = nnx.Optimizer(layer, optax.adamw(1e-2), wrt=OFTParam)
    x = rand((4, 64))
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, OFTParam))(layer)
    assert set(nnx.to_flat_state(grads).to_nested_state().keys()) == {"oft_R"}
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction promotes an int count
        opt.update(layer, grads)
    assert not np.array_equal(np.asarray(layer.oft_R["a0"][...]), before)
    for a, b in zip(
        jax.tree.leaves(nnx.state(layer, nnx.Not(OFTParam))), jax.tree.leaves(frozen), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert isinstance(layer.base_layer.weight, QuantWeight)


class _ScaledLinear(nnx.Module):
    """A base of its own (``y = 2 x W^T``) that implements ``LinearBase`` instead of being in ``BASE_OPS``."""

    def __init__(self, w):
        self.w = nnx.Param(w)
        self.out_features, self.in_features = w.shape

    def __call__(self, x):
        return x @ self.dense_weight().T

    def dense_weight(self, dtype=None):
        w = 2 * self.w[...]
        return w if dtype is None else w.astype(dtype)

    def set_dense_weight(self, w):
        self.w[...] = w / 2

    def rotated_forward(self, x, rotations):
        return rotated_matmul(x, rotations, self.dense_weight().T)


def test_any_linear_base_is_wrapped_both_paths_agree_and_it_merges():
    from oftjax.nn._base import EmbedOps, FloatLinearOps

    assert isinstance(base_ops(make_base("float", 8, 4)), FloatLinearOps)
    assert isinstance(base_ops(nnx.Embed(4, 8, rngs=nnx.Rngs(0))), EmbedOps)
    quantized = make_base("nf4", 64, 4)
    assert base_ops(quantized) is quantized  # Linear4bit implements the protocol itself
    with pytest.raises(TypeError, match="OFT supports nnx.Linear.*got LayerNorm"):
        OFTLinear(nnx.LayerNorm(8, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="not one"):
        OFTLinear(nnx.Embed(4, 8, rngs=nnx.Rngs(0)))
    w = rand((6, 16), seed=3)
    x = rand((5, 16), seed=4)
    layers = {
        rotate: _wrapped_base(_ScaledLinear(w), rotate, AdapterSettings(r=4, block_size=4))
        for rotate in ("input", "weight")
    }
    want = np.asarray(x, np.float64) @ np.asarray(layers["input"].delta_weight("a0"), np.float64)
    want = want @ (2 * np.asarray(w, np.float64)).T
    for layer in layers.values():
        np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=FWD.rtol, atol=FWD.atol)
    layer = layers["weight"]
    report = merge_layer(layer)
    assert report.kind == "_ScaledLinear" and layer.merged_adapters == ("a0",)
    np.testing.assert_allclose(np.asarray(layer.base_layer(x)), want, rtol=FWD.rtol, atol=FWD.atol)
