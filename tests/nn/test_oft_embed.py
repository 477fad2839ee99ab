"""OFTEmbed: identity at init, output rotation, merge/unmerge order, COFT, dropout, adapters, surgery, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import oftjax
from oftjax import oft
from oftjax.config import OFTConfig
from oftjax.nn import AdapterSettings, OFTEmbed, OFTLinear, OFTParam
from tests.nn._helpers import COMPILES
from tests.tolerances import TOL

FWD, ROUNDTRIP = TOL["fp32_forward"], TOL["oft_unmerge_roundtrip"]
IDS = jnp.array([[1, 2, 3, 0], [4, 5, 19, 7]], jnp.int32)


def _embed(num=20, d=16, seed=0):
    return nnx.Embed(num, d, rngs=nnx.Rngs(seed))


def _wrapped(*settings, num=20, d=16):
    layer = OFTEmbed(_embed(num, d))
    for i, s in enumerate(settings):
        layer.add_adapter(f"a{i}", s, init_weights=False, rngs=nnx.Rngs(10 + i))
    return layer


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(20, 8, rngs=rngs)
        self.q_proj = nnx.Linear(8, 8, rngs=rngs)
        self.lm_head = nnx.Linear(8, 20, rngs=rngs)

    def __call__(self, ids):
        return self.lm_head(self.q_proj(self.embed_tokens(ids)))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_identity_at_init_is_bit_exact_and_holds_the_base(jit):
    base = _embed()
    want = base(IDS)
    layer = OFTEmbed(base)
    layer.add_adapter("default", AdapterSettings(r=4, block_size=4))
    layer.add_adapter("other", AdapterSettings(r=8, block_size=2, coft=True, eps=1e-3, block_share=True))
    layer.set_active_adapters(["default", "other"])
    got = nnx.jit(lambda m, x: m(x))(layer, IDS) if jit else layer(IDS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert set(nnx.state(layer).keys()) == {"base_layer", "oft_embedding_R"}
    assert set(nnx.state(layer)["base_layer"].keys()) == {"embedding"}
    assert layer.base_layer is base  # held, not copied
    assert isinstance(layer.oft_embedding_R["default"], OFTParam)
    assert layer.oft_embedding_R["other"][...].shape == (1, 1)
    assert (layer.in_features, layer.out_features, layer.base_layer.num_embeddings) == (16, 16, 20)


def test_output_is_rotated_by_the_chain_of_adapters():
    """y = emb(ids) BD_a BD_b (row vectors; non-commuting b >= 4), also under jit."""
    layer = _wrapped(AdapterSettings(r=4, block_size=4), AdapterSettings(r=2, block_size=8))
    layer.set_active_adapters(["a0", "a1"])
    BDa, BDb = (np.asarray(layer.delta_weight(n), np.float64) for n in ("a0", "a1"))
    W = np.asarray(layer.base_layer.embedding[...], np.float64)
    want = W[np.asarray(IDS)] @ BDa @ BDb
    np.testing.assert_allclose(np.asarray(layer(IDS)), want, rtol=FWD.rtol, atol=FWD.atol)
    np.testing.assert_allclose(
        np.asarray(nnx.jit(lambda m, x: m(x))(layer, IDS)), want, rtol=FWD.rtol, atol=FWD.atol
    )
    np.testing.assert_allclose(
        np.asarray(layer.delta_weight("a0")), np.asarray(oft.block_diag(layer.rotation_blocks("a0")))
    )
    # attend (tied heads) sees the base table, as PEFT's tied lm_head does.
    q = jnp.ones((2, 16))
    np.testing.assert_array_equal(
        np.asarray(layer.attend(q)), np.asarray(q @ layer.base_layer.embedding[...].T)
    )


def test_merge_in_forward_order_and_unmerge():
    layer = _wrapped(AdapterSettings(r=4, block_size=4), AdapterSettings(r=2, block_size=8))
    layer.set_active_adapters(["a0", "a1"])
    W0 = np.asarray(layer.base_layer.embedding[...])
    y = np.asarray(layer(IDS))
    BDa, BDb = (np.asarray(layer.delta_weight(n), np.float64) for n in ("a0", "a1"))

    class Holder(nnx.Module):
        def __init__(self, emb):
            self.emb = emb

    model = Holder(layer)
    report = oftjax.merge(model)
    assert report.layers["emb"].kind == "Embed" and report.layers["emb"].adapters == ("a0", "a1")
    assert layer.merged_adapters == ("a0", "a1")
    np.testing.assert_allclose(
        np.asarray(layer.base_layer.embedding[...]), W0 @ BDa @ BDb, rtol=FWD.rtol, atol=FWD.atol
    )
    np.testing.assert_allclose(np.asarray(layer(IDS)), y, rtol=FWD.rtol, atol=FWD.atol)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        oftjax.merge(model)
    oftjax.unmerge(model)
    assert layer.merged_adapters == ()
    np.testing.assert_allclose(
        np.asarray(layer.base_layer.embedding[...]), W0, rtol=ROUNDTRIP.rtol, atol=ROUNDTRIP.atol
    )
    # disable_adapters unmerges first (PEFT), then runs the base.
    oftjax.merge(model)
    with layer.disable_adapters():
        assert layer.merged_adapters == ()
        np.testing.assert_allclose(
            np.asarray(layer(IDS)), W0[np.asarray(IDS)], rtol=ROUNDTRIP.rtol, atol=ROUNDTRIP.atol
        )


def test_coft_projects_and_writes_back_under_jit():
    layer = _wrapped(AdapterSettings(r=4, block_size=4, coft=True, eps=1e-2))
    projected = oft.coft_project(layer.oft_embedding_R["a0"][...], 1e-2)
    nnx.jit(lambda m, x: m(x))(layer, IDS)
    np.testing.assert_array_equal(np.asarray(layer.oft_embedding_R["a0"][...]), np.asarray(projected))


def test_block_share_uses_one_block_everywhere():
    layer = _wrapped(AdapterSettings(r=4, block_size=4, block_share=True))
    assert layer.oft_embedding_R["a0"][...].shape == (1, 6)
    R = np.asarray(layer.rotation_blocks("a0"))
    for i in range(1, 4):
        np.testing.assert_array_equal(R[i], R[0])


def test_module_dropout_in_training_only():
    layer = OFTEmbed(_embed())
    layer.add_adapter(
        "d", AdapterSettings(r=8, block_size=2, module_dropout=0.5), init_weights=False,
        rngs=nnx.Rngs(params=0, dropout=1),
    )  # fmt: skip
    y_train = np.asarray(layer(IDS))
    layer.eval()
    y_eval = np.asarray(layer(IDS))
    assert not np.allclose(y_train, y_eval)
    np.testing.assert_array_equal(np.asarray(layer(IDS)), y_eval)
    R = np.asarray(nnx.view(layer, deterministic=False).rotation_blocks("d", training=True))
    assert sum(np.array_equal(R[i], np.eye(2, dtype=np.float32)) for i in range(8)) == 4


def test_adapter_management_and_errors():
    base = _embed()
    layer = OFTEmbed(base)
    layer.add_adapter("a", AdapterSettings(r=4, block_size=4), init_weights=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a", AdapterSettings(r=4, block_size=4))
    with pytest.raises(ValueError, match="do not tile in_features=16"):
        layer.add_adapter("bad", AdapterSettings(r=3, block_size=4))
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_active_adapters(["nope"])
    layer.add_adapter("b", AdapterSettings(r=2, block_size=8), init_weights=False, rngs=nnx.Rngs(1))
    assert layer.active_adapters == ("a", "b")
    y_ab = layer(IDS)
    with layer.disable_adapters():
        np.testing.assert_array_equal(np.asarray(layer(IDS)), np.asarray(base(IDS)))
    np.testing.assert_array_equal(np.asarray(layer(IDS)), np.asarray(y_ab))
    layer.set_active_adapters("a")
    y_a = layer(IDS)
    layer.delete_adapter("b")
    assert list(layer.adapters) == ["a"] and "b" not in layer.oft_embedding_R
    np.testing.assert_array_equal(np.asarray(layer(IDS)), np.asarray(y_a))
    with pytest.raises(TypeError, match="already an OFTEmbed"):
        OFTEmbed(layer)
    with pytest.raises(TypeError, match="wraps an nnx.Embed"):
        OFTEmbed(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_apply_oft_wraps_embeddings_only_when_named():
    model = Tiny(nnx.Rngs(0))
    cfg = OFTConfig(oft_block_size=4, target_modules=["embed_tokens", "q_proj"], init_weights=False)
    assert oftjax.apply_oft(model, cfg, rngs=nnx.Rngs(1)) == ["embed_tokens", "q_proj"]
    assert isinstance(model.embed_tokens, OFTEmbed) and isinstance(model.q_proj, OFTLinear)
    assert [p for p, _ in oftjax.oft_layers(model)] == ["embed_tokens", "q_proj"]
    assert model.embed_tokens.adapters["default"].block_size == 4
    # a second adapter goes onto the existing wrapper, inactive (PEFT)
    oftjax.apply_oft(
        model, OFTConfig(r=2, oft_block_size=0, target_modules=["embed_tokens"]), adapter_name="two"
    )
    assert model.embed_tokens.active_adapters == ("default",)
    oftjax.set_adapter(model, ["default", "two"])
    oftjax.delete_adapter(model, "two")
    assert list(model.embed_tokens.adapters) == ["default"]
    other = Tiny(nnx.Rngs(0))  # "all-linear" never adapts embeddings (PEFT)
    assert oftjax.apply_oft(other, OFTConfig(r=2, oft_block_size=0, target_modules="all-linear")) == [
        "q_proj"
    ]
    with pytest.raises(TypeError, match="nnx.Embed are supported"):
        bad = Tiny(nnx.Rngs(0))
        bad.norm = nnx.LayerNorm(8, rngs=nnx.Rngs(0))
        oftjax.apply_oft(bad, OFTConfig(r=2, oft_block_size=0, target_modules=["norm"]))


def test_training_by_type_reaches_only_rotations_and_compiles_once():
    model = Tiny(nnx.Rngs(0))
    oftjax.apply_oft(model, OFTConfig(oft_block_size=4, target_modules=["embed_tokens", "q_proj"]))
    frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(OFTParam)))
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=OFTParam)

    @nnx.jit
    def step(m, opt, ids):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(ids) ** 2), argnums=nnx.DiffState(0, OFTParam))(m)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction promotes an int count
            opt.update(m, g)
        return loss

    ids2 = jnp.asarray((np.asarray(IDS) + 1) % 20)  # built before counting (an eager add compiles)
    step(model, opt, IDS)
    with COMPILES.counting() as c:
        step(model, opt, ids2)
    assert c.count == 0
    assert np.abs(np.asarray(model.embed_tokens.oft_embedding_R["default"][...])).max() > 0
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(OFTParam)))
    jax.tree.map(np.testing.assert_array_equal, after, frozen)
